"""--beta auto: a short attack and its sweep choose beta, recomputed."""

from __future__ import annotations

import pytest
import torch

import betasmooth as bs
from betasmooth import attack
from betasmooth.recommend import recommend_beta, verdict


@pytest.mark.parametrize(
    ("cells", "chosen"),
    [
        # A median fidelity of exactly 0 was ranked as -1, below -0.3.
        ({"0.5": 0.0, "1": -0.3, "2": None}, 0.5),
        # Equally faithful: the larger beta, which changes the network less.
        ({"0.5": 0.2, "1": 0.2, "2": None}, 1.0),
        # A missing median ranks below every number, -1 included.
        ({"0.5": -1.0, "1": None}, 0.5),
        # Ties are broken by the beta's value, not its key: "2" > "10" as strings.
        ({"2": 0.2, "10": 0.2, "5": None}, 10.0),
        # A strongly negative median is the least faithful, not the most (no abs).
        ({"0.5": -0.8, "1": 0.1}, 1.0),
    ],
)
def test_calibration_without_a_faithful_beta_takes_the_most_faithful(monkeypatch, cells, chosen):
    import betasmooth.calibrate as calibrate

    class Sweep:
        def summary(self, min_fidelity):
            return {
                "min_fidelity": min_fidelity,
                "recommended_beta": None,
                "betas": {b: {"fidelity_pcc": f, "robustness_pcc": 0.5} for b, f in cells.items()},
            }

    monkeypatch.setattr(calibrate, "defense_sweep", lambda *args, **kwargs: Sweep())
    x = bs.load_data("digits", split="train")[0][:2]
    found = calibrate.calibrate_beta(bs.load_model("digits-cnn"), x, betas=[0.5, 1.0, 2.0], steps=1)
    assert (found.beta, found.recommended) == (chosen, False)


def test_calibration_with_a_recommended_beta_says_recommended(monkeypatch):
    # The record written to config.json says whether the sweep recommended the beta.
    import betasmooth.calibrate as calibrate

    class Sweep:
        def summary(self, min_fidelity):
            return {
                "min_fidelity": min_fidelity,
                "recommended_beta": 2.0,
                "undefended": {"robustness_pcc": 0.4},
                "betas": {
                    "0.5": {"fidelity_pcc": 0.95, "robustness_pcc": 0.5},
                    "2": {"fidelity_pcc": 0.99, "robustness_pcc": 0.6},
                },
            }

    monkeypatch.setattr(calibrate, "defense_sweep", lambda *args, **kwargs: Sweep())
    x = bs.load_data("digits", split="train")[0][:2]
    found = calibrate.calibrate_beta(bs.load_model("digits-cnn"), x, betas=[0.5, 2.0], steps=1)
    assert (found.beta, found.recommended) == (2.0, True)
    # The whole summary: a verdict read back from config.json is the one the run said.
    assert found.record() == {"beta": 2.0, "recommended": True, **Sweep().summary(0.9)}
    assert (
        verdict(found.record())
        == verdict(found.summary)
        == (
            "recommended beta 2 (most robust with median fidelity >= 0.9): "
            "robustness 0.600 vs 0.400 undefended, more robust"
        )
    )


def test_calibration_is_the_sweep_of_its_own_attack_recomputed():
    # calibrate_beta = targets drawn with the seed, the attack, the sweep of x against
    # x_adv. Of 6 images there are 120 cycles of targets (of 3, only 2, which two seeds
    # often share), so the seed's own cycle is the one that gives the summary back.
    from betasmooth.calibrate import calibrate_beta

    model = bs.load_model("digits-cnn")
    x = bs.load_data("digits", split="train")[0][:6]
    seed, betas = 3, [1.0, 20.0]
    found = calibrate_beta(model, x, betas=betas, steps=5, seed=seed)
    maps = bs.heatmap(bs.explain(model, x, "gradient"))
    targets = attack.random_targets(maps, torch.Generator().manual_seed(seed))
    others = attack.random_targets(maps, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(targets, others)
    result = bs.manipulate(model, x, targets, "gradient", steps=5, seed=seed)
    sweep = bs.defense_sweep(
        model, x, result.x_adv, targets, "gradient", betas, defenses=("beta_smooth",), seed=seed
    )
    assert found.summary == sweep.summary()


def test_calibration_record_keeps_the_min_fidelity_it_was_given():
    # The record written to config.json says the threshold the choice was made at, so
    # that recommend_beta of its own cells and threshold gives its choice back. At
    # 0.999 no beta is faithful enough (beta 20's median fidelity is about 0.991), though
    # at the default 0.9 beta 20 would be recommended.
    from betasmooth.calibrate import calibrate_beta

    model = bs.load_model("digits-cnn")
    x = bs.load_data("digits", split="train")[0][:2]
    betas = [1.0, 20.0]
    found = calibrate_beta(model, x, betas=betas, steps=2, min_fidelity=0.999)
    record = found.record()
    assert record["min_fidelity"] == 0.999 == found.summary["min_fidelity"]
    assert record["betas"] == found.summary["betas"]
    assert not found.recommended
    assert recommend_beta(record["betas"], record["min_fidelity"]) is None
    assert recommend_beta(record["betas"]) == 20.0


def test_calibration_refuses_a_single_image_before_the_attack():
    # Each image's target is another image's map: one image has none to take.
    from betasmooth.calibrate import calibrate_beta

    x = bs.load_data("digits", split="train")[0][:1]
    with pytest.raises(bs.InputError, match=r"^calibrating beta needs at least 2 images; got 1$"):
        calibrate_beta(bs.load_model("digits-cnn"), x, betas=[1.0], steps=1)


def test_calibration_record_of_an_unrecommended_beta_says_so():
    # The record of the most faithful beta taken when none was recommended says
    # recommended false; its summary's fields follow, unchanged.
    from betasmooth.calibrate import Calibration

    summary = {"min_fidelity": 0.999, "recommended_beta": None, "betas": {"1": {}}}
    assert Calibration(20.0, False, summary).record() == {
        "beta": 20.0,
        "recommended": False,
        "min_fidelity": 0.999,
        "recommended_beta": None,
        "betas": {"1": {}},
    }


def test_calibration_attacks_and_sweeps_with_the_options_and_range_it_was_given(monkeypatch):
    # The attack takes the method's attack options (LRP's box from data_range, not
    # the caller's bare options) and the sweep the same options and data_range.
    import types

    import betasmooth.calibrate as calibrate

    seen = {}

    def manipulate(model, x, targets, method, **kwargs):
        seen["manipulate"], seen["targets"] = kwargs, targets
        return types.SimpleNamespace(x_adv=x.clone())

    class Sweep:
        def summary(self, min_fidelity):
            return {"min_fidelity": min_fidelity, "recommended_beta": 2.0, "betas": {"2": {}}}

    def defense_sweep(*args, **kwargs):
        seen["defense_sweep"] = kwargs
        return Sweep()

    monkeypatch.setattr(calibrate, "manipulate", manipulate)
    monkeypatch.setattr(calibrate, "defense_sweep", defense_sweep)
    x = bs.load_data("digits", split="train")[0][:3]
    model = bs.load_model("digits-cnn")
    found = calibrate.calibrate_beta(
        model, x, "lrp", betas=[2.0], steps=1, data_range=(-1.0, 2.0),
        method_options={"epsilon": 0.5}, seed=4,
    )  # fmt: skip
    assert found.beta == 2.0
    # The caller's epsilon is kept next to the box; the targets are the maps of the
    # options attacked (box [-1, 2], epsilon 0.5), drawn with the seed given.
    box = {"low": -1.0, "high": 2.0, "epsilon": 0.5}
    maps = bs.heatmap(bs.explain(model, x, "lrp", **box))
    targets = attack.random_targets(maps, torch.Generator().manual_seed(4))
    torch.testing.assert_close(seen["targets"], targets, rtol=0, atol=0)
    # The box and epsilon change the maps, so targets drawn without them would differ.
    plain = bs.heatmap(bs.explain(model, x, "lrp"))
    assert not torch.allclose(maps, plain, rtol=1e-3, atol=0)
    assert seen["manipulate"]["method_options"] == box
    assert seen["manipulate"]["data_range"] == (-1.0, 2.0)
    assert seen["defense_sweep"]["method_options"] == box
    assert seen["defense_sweep"]["data_range"] == (-1.0, 2.0)
    # The seed seeds the attack and the sweep's draws too, not the targets alone.
    assert seen["manipulate"]["seed"] == seen["defense_sweep"]["seed"] == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"betas": []},
            r"^betas must hold at least one positive number, e.g. \[0.5, 1, 2, 5\]$",
        ),
        ({"betas": [1.0, 1.0]}, r"^betas must differ; 1 given more than once$"),
        ({"min_fidelity": 1.5}, r"^min_fidelity must be a number from 0 to 1 \(a median PCC\)"),
    ],
)
def test_calibration_refuses_bad_betas_and_min_fidelity_before_the_attack(
    monkeypatch, options, message
):
    import betasmooth.calibrate as calibrate

    def manipulate(*args, **kwargs):
        raise AssertionError("the attack ran before the arguments were checked")

    monkeypatch.setattr(calibrate, "manipulate", manipulate)
    x = bs.load_data("digits", split="train")[0][:2]
    with pytest.raises(bs.InputError, match=message):
        calibrate.calibrate_beta(bs.load_model("digits-cnn"), x, steps=1, **options)


def test_calibration_defaults_are_the_documented_ones(monkeypatch):
    # README (--beta auto): each image attacked for 100 steps on the gradient map, a
    # sweep over 0.5, 1, 2, 5, 10, 20, 50 of beta_smooth alone, fidelity 0.9; and the
    # signature's [0, 1] data range, seed 0, no progress bars.
    import types

    import betasmooth.calibrate as calibrate

    seen = {}

    def manipulate(model, x, targets, method, **kwargs):
        seen["manipulate"] = (method, targets, kwargs)
        return types.SimpleNamespace(x_adv=x.clone())

    class Sweep:
        def summary(self, min_fidelity):
            seen["min_fidelity"] = min_fidelity
            return {"min_fidelity": min_fidelity, "recommended_beta": 2.0, "betas": {"2": {}}}

    def defense_sweep(model, x, x_adv, targets, method, betas, **kwargs):
        seen["defense_sweep"] = (method, list(betas), kwargs)
        return Sweep()

    monkeypatch.setattr(calibrate, "manipulate", manipulate)
    monkeypatch.setattr(calibrate, "defense_sweep", defense_sweep)
    model = bs.load_model("digits-cnn")
    x = bs.load_data("digits", split="train")[0][:3]
    calibrate.calibrate_beta(model, x)
    method, targets, kwargs = seen["manipulate"]
    assert method == "gradient"
    assert (kwargs["steps"], kwargs["seed"], kwargs["progress"]) == (100, 0, False)
    assert kwargs["data_range"] == (0.0, 1.0)
    maps = bs.heatmap(bs.explain(model, x, "gradient"))
    torch.testing.assert_close(
        targets, attack.random_targets(maps, torch.Generator().manual_seed(0)), rtol=0, atol=0
    )
    method, betas, kwargs = seen["defense_sweep"]
    assert method == "gradient"
    assert betas == [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
    assert kwargs["defenses"] == ("beta_smooth",)
    assert (kwargs["seed"], kwargs["progress"], kwargs["data_range"]) == (0, False, (0.0, 1.0))
    assert seen["min_fidelity"] == 0.9
