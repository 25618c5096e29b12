"""Normalised data carry their bounds; the sweep's robustness, fidelity and recommended beta."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import betasmooth as bs
from betasmooth.attack import default_weights
from betasmooth.calibrate import calibrate_beta
from betasmooth.cli import main
from betasmooth.explain import range_options
from betasmooth.recommend import format_summary, recommend_beta
from betasmooth.store import RunDir, read_jsonl
from betasmooth.validate import InputError
from nets import plain_cnn
from test_explain_lrp import zennit_lrp

MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]
FACTORY = """
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5),
    )
"""


def box():
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return mean, std, (0 - mean) / std, (1 - mean) / std


@pytest.fixture
def user_files(tmp_path):
    (tmp_path / "model.py").write_text(FACTORY)
    raw = np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=raw)
    return tmp_path / "model.py", tmp_path / "data.npz", torch.from_numpy(raw)


def test_load_data_carries_per_channel_bounds(user_files):
    _, data_file, raw = user_files
    mean, std, low, high = box()
    data = bs.load_data(str(data_file), mean=MEAN, std=STD)
    x, y = data
    torch.testing.assert_close(x, (raw - mean) / std)
    torch.testing.assert_close(data.low, low)
    torch.testing.assert_close(data.high, high)
    torch.testing.assert_close(data.denormalise(x), raw)
    again = pickle.loads(pickle.dumps(data))
    torch.testing.assert_close(again.bounds[1], high)
    plain = bs.load_data("digits")
    assert plain.low.flatten().tolist() == [0.0] and plain.high.flatten().tolist() == [1.0]


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (torch.rand(2, 1, 16, 16), "x has shape (2, 1, 16, 16); expected images of these data, "),
        (torch.rand(2, 4, 16, 16), "x has shape (2, 4, 16, 16); expected images of these data, "),
        (torch.rand(3, 16, 16), "x must have at least 4 dimensions with the batch first, "),
        (torch.full((1, 3, 2, 2), 2, dtype=torch.uint8), "x must be a floating tensor "),
    ],
)
def test_denormalise_refuses_what_are_not_images_of_the_data(user_files, given, said):
    # Grey spread to three channels, a batch added, or statistics cast to uint8 (all
    # zeros) would be shown as the images: refused in one line instead.
    data = bs.load_data(str(user_files[1]), mean=MEAN, std=STD)
    with pytest.raises(InputError) as err:
        data.denormalise(given)
    assert str(err.value).startswith(said)
    double = data.denormalise(data.x.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, user_files[2].double(), atol=1e-6, rtol=0)


def test_api_lrp_with_the_loaded_bounds_is_zennit(user_files):
    model_file, data_file, _ = user_files
    net = bs.load_model(f"{model_file}:net").double()
    data = bs.load_data(str(data_file), mean=MEAN, std=STD)
    x = data.x.double()
    target = net(x).argmax(1)
    ours = bs.explain(net, x, "lrp", target, low=data.low.double(), high=data.high.double())
    low, high = data.low.double().expand_as(x), data.high.double().expand_as(x)
    theirs = zennit_lrp(net, x.clone(), target, low, high)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-14)
    # The default box [0, 1] on these inputs would be another map: it is refused.
    with pytest.raises(InputError, match=r"outside the lrp input box \[0.0, 1.0\].*data.low"):
        bs.explain(net, x, "lrp", target)
    for method, options in (("beta_smooth", {"base": "lrp"}), ("smoothgrad", {"base": "lrp"})):
        with pytest.raises(InputError, match="outside the lrp input box"):
            bs.explain(net, x, method, target, **options)
    # A composite without the box needs none; SmoothGrad's noisy copies may leave the box.
    bs.explain(net, x, "lrp", target, composite="epsilon_plus_flat")
    bs.explain(net, x, "smoothgrad", target, base="lrp", low=data.low, high=data.high, n=2)


def _normalised_double(user_files):
    """The user's net and data, normalised, in float64, with the data's bounds."""
    model_file, data_file, _ = user_files
    net = bs.load_model(f"{model_file}:net").double()
    data = bs.load_data(str(data_file), mean=MEAN, std=STD)
    return net, data.x.double(), data.low.double(), data.high.double()


def test_attack_and_sweep_give_lrp_their_data_range_as_its_box(user_files):
    net, x, low, high = _normalised_double(user_files)
    target = net(x).argmax(1)
    target_map = bs.heatmap(
        zennit_lrp(net, x.roll(1, 0), target, low.expand_as(x), high.expand_as(x))
    )
    attack = dict(steps=3, data_range=(low, high))
    result = bs.manipulate(net, x, target_map, "lrp", **attack)
    # The map attacked is zennit's with the data's box; the attack is the one
    # given that box by hand.
    theirs = zennit_lrp(net, x.clone(), target, low.expand_as(x), high.expand_as(x))
    torch.testing.assert_close(result.map_orig, bs.heatmap(theirs), rtol=1e-9, atol=1e-14)
    by_hand = bs.manipulate(
        net, x, target_map, "lrp", method_options={"low": low, "high": high}, **attack
    )
    torch.testing.assert_close(result.x_adv, by_hand.x_adv, rtol=0, atol=0)
    # A box of the caller's own wins: its map is zennit's with that box.
    wide = {"low": low - 1, "high": high + 1}
    other = bs.manipulate(net, x, target_map, "lrp", method_options=wide, **attack)
    theirs = zennit_lrp(net, x.clone(), target, (low - 1).expand_as(x), (high + 1).expand_as(x))
    torch.testing.assert_close(other.map_orig, bs.heatmap(theirs), rtol=1e-9, atol=1e-14)
    assert not torch.allclose(other.map_orig, result.map_orig)
    # The sweep too: its undefended map of x is the same map as the attack's.
    sweep = bs.defense_sweep(net, x, result.x_adv, target_map, "lrp", [1.0], data_range=(low, high))
    plain = bs.heatmap(bs.explain(net, result.x_adv, "lrp", target, low=low, high=high))
    expected = bs.compare(plain, result.map_orig)["pcc"]
    got = torch.tensor(
        [r["undefended_pcc"] for r in sweep.records() if r["defense"] == "beta_smooth"]
    )
    # The records hold float32 numbers.
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6)


def test_sweep_run_checks_its_defenses_with_the_box_of_the_data_range(user_files, tmp_path):
    # The check before a sweep gave the defended LRP the default box [0, 1], and refused
    # normalised x that the sweep itself explains with data_range's box.
    from betasmooth.runs import attack_run, sweep_run

    net, x, low, high = _normalised_double(user_files)
    y = torch.zeros(len(x), dtype=torch.long)
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, net, x, y, ["lrp"], steps=2, data_range=(low, high))
    rows = sweep_run(run, net, [1.0], smoothgrad_n=2, data_range=(low, high))
    with np.load(tmp_path / "run" / "arrays" / "lrp-0.npz") as saved:
        x_adv, target = (torch.from_numpy(saved[k]) for k in ("x_adv", "map_target"))
    direct = bs.defense_sweep(
        net, x, x_adv, target, "lrp", [1.0], defenses=("beta_smooth",), data_range=(low, high)
    )
    got = {r["index"]: r["adv_vs_clean_pcc"] for r in rows if r["defense"] == "beta_smooth"}
    want = {r["index"]: r["adv_vs_clean_pcc"] for r in direct.records()}
    assert sorted(got) == sorted(want) == list(range(len(x)))
    for i in want:
        assert got[i] == pytest.approx(want[i], abs=1e-6)


@pytest.mark.parametrize(
    "method, options",
    [("beta_smooth", {"base": "lrp"}), ("smoothgrad", {"base": "lrp", "n": 2, "seed": 0})],
)
def test_attack_gives_a_wrapped_lrp_the_data_range_as_its_box(user_files, method, options):
    net, x, low, high = _normalised_double(user_files)
    target_map = bs.heatmap(bs.explain(net, x.roll(1, 0), "lrp", low=low, high=high))
    attack = dict(steps=2, data_range=(low, high))
    result = bs.manipulate(net, x, target_map, method, method_options=options, **attack)
    boxed = {**options, "base_options": {"low": low, "high": high}}
    by_hand = bs.manipulate(net, x, target_map, method, method_options=boxed, **attack)
    torch.testing.assert_close(result.map_orig, by_hand.map_orig, rtol=0, atol=0)
    torch.testing.assert_close(result.x_adv, by_hand.x_adv, rtol=0, atol=0)
    # Without the data's range the default box [0, 1] is refused for these x.
    with pytest.raises(InputError, match="outside the lrp input box"):
        bs.manipulate(net, x, target_map, method, method_options=options, steps=2, data_range=None)


def test_attack_starts_integrated_gradients_from_the_data_ranges_black(user_files):
    from captum.attr import IntegratedGradients

    net, x, low, high = _normalised_double(user_files)
    target = net(x).argmax(1)
    target_map = bs.heatmap(bs.explain(net, x.roll(1, 0), "gradient"))
    attack = dict(steps=2, data_range=(low, high))
    # Integrated gradients from the black image (data.low), not from 0, the mean colour:
    # Captum's with the attack's 30 points.
    result = bs.manipulate(net, x, target_map, "integrated_gradients", **attack)
    steps = bs.attack.ATTACK_DEFAULTS["integrated_gradients"]["options"]["steps"]
    ig = IntegratedGradients(net).attribute(
        x, baselines=low.expand_as(x), target=target, n_steps=steps, method="gausslegendre"
    )
    # Captum's quadrature weights are rounded to float32: 4e-8 relative.
    torch.testing.assert_close(result.map_orig, bs.heatmap(ig), rtol=1e-6, atol=1e-9)


def test_one_bound_of_the_lrp_box_takes_the_other_from_the_data_range(user_files):
    net, x, low, high = _normalised_double(user_files)
    target = net(x).argmax(1)
    target_map = bs.heatmap(bs.explain(net, x.roll(1, 0), "lrp", low=low, high=high))
    result = bs.manipulate(
        net, x, target_map, "lrp", steps=1, data_range=(low, high), method_options={"low": low - 1}
    )
    theirs = zennit_lrp(net, x.clone(), target, (low - 1).expand_as(x), high.expand_as(x))
    torch.testing.assert_close(result.map_orig, bs.heatmap(theirs), rtol=1e-9, atol=1e-14)


def test_calibrate_beta_gives_lrp_the_data_range(user_files):
    net, x, low, high = _normalised_double(user_files)
    settings = dict(betas=[1.0, 5.0], steps=2, data_range=(low, high))
    found = calibrate_beta(net, x, "lrp", **settings)
    by_hand = calibrate_beta(net, x, "lrp", method_options={"low": low, "high": high}, **settings)
    assert found.summary == by_hand.summary and found.beta == by_hand.beta
    with pytest.raises(InputError, match="outside the lrp input box"):
        calibrate_beta(net, x, "lrp", **{**settings, "data_range": None})


def _explain_normalised(model_file, data_file, method: str, out) -> None:
    argv = ["explain", "--model", f"{model_file}:net", "--data", str(data_file)]
    argv += ["--mean", *map(str, MEAN), "--std", *map(str, STD), "--method", method]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0


def test_cli_explain_lrp_with_mean_std_is_zennit(user_files, tmp_path):
    model_file, data_file, raw = user_files
    out = tmp_path / "run"
    _explain_normalised(model_file, data_file, "lrp", out)
    mean, std, low, high = box()
    with np.load(out / "arrays" / "lrp-0.npz") as saved:
        x, saved_map = torch.from_numpy(saved["x"]), torch.from_numpy(saved["map"])
    torch.testing.assert_close(x, (raw - mean) / std)
    net = bs.load_model(f"{model_file}:net").double()
    x = x.double()
    target = net(x).argmax(1)
    r = zennit_lrp(net, x.clone(), target, low.double().expand_as(x), high.double().expand_as(x))
    expected = r.abs().sum(1) / r.abs().sum((1, 2, 3)).view(-1, 1, 1)
    torch.testing.assert_close(saved_map.double(), expected, rtol=1e-5, atol=1e-8)


def test_cli_attack_of_a_smoothing_of_lrp_gives_its_base_the_data_range(user_files, tmp_path):
    # attack gave the base LRP of --option beta_smooth.base=lrp the default box [0, 1] in
    # its checks, and refused normalised data that the attack itself boxes right (explain
    # did not). The stored original map is LRP of the smoothed network with the data's box.
    model_file, data_file, raw = user_files
    out = tmp_path / "run"
    argv = ["attack", "--model", f"{model_file}:net", "--data", str(data_file), "-n", "2"]
    argv += ["--mean", *map(str, MEAN), "--std", *map(str, STD), "--no-progress"]
    argv += ["--method", "beta_smooth", "--option", "beta_smooth.base=lrp", "--steps", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    _, _, low, high = box()
    net = bs.load_model(f"{model_file}:net").double()
    with np.load(out / "arrays" / "beta_smooth-0.npz") as saved:
        x, map_orig = torch.from_numpy(saved["x"]).double(), torch.from_numpy(saved["map_orig"])
    beta = bs.attack.ATTACK_DEFAULTS["beta_smooth"]["options"]["beta"]
    smoothed = bs.explain(
        net, x, "beta_smooth", base="lrp", beta=beta,
        base_options={"low": low.double(), "high": high.double()},
    )  # fmt: skip
    torch.testing.assert_close(map_orig.double(), bs.heatmap(smoothed), rtol=1e-4, atol=1e-7)


def _pcc(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return [scipy.stats.pearsonr(u.ravel(), v.ravel())[0] for u, v in zip(a, b)]


def test_sweep_summary_is_robustness_fidelity_and_the_rule(digits, digits_cnn):
    x = digits[0][:4]
    maps = bs.heatmap(bs.explain(digits_cnn, x, "gradient"))
    targets = maps.roll(1, 0)
    attacked = bs.manipulate(digits_cnn, x, targets, "gradient", steps=20)
    betas = [1.0, 5.0, 20.0]
    sweep = bs.defense_sweep(digits_cnn, x, attacked.x_adv, targets, "gradient", betas)
    summary = sweep.summary(min_fidelity=0.9)
    label = digits_cnn(x).argmax(1)
    plain = bs.heatmap(bs.explain(digits_cnn, attacked.x_adv, "gradient", label)).detach()
    assert summary["undefended"]["robustness_pcc"] == pytest.approx(
        np.median(_pcc(plain, maps)), abs=1e-5
    )
    cells = {}
    for beta in betas:
        adv, clean = sweep.maps[("beta_smooth", beta)]
        cell = summary["betas"][f"{beta:g}"]
        assert cell["robustness_pcc"] == pytest.approx(np.median(_pcc(adv, clean)), abs=1e-5)
        assert cell["fidelity_pcc"] == pytest.approx(np.median(_pcc(clean, maps)), abs=1e-5)
        cells[beta] = cell
    faithful = [b for b, c in cells.items() if c["fidelity_pcc"] >= 0.9]
    expected = max(faithful, key=lambda b: (cells[b]["robustness_pcc"], b)) if faithful else None
    assert summary["recommended_beta"] == expected
    # A threshold no median fidelity reaches (each is below 1): none is recommended.
    assert all(c["fidelity_pcc"] < 1.0 for c in cells.values())
    assert sweep.summary(min_fidelity=1.0)["recommended_beta"] is None
    # Rows of the library carry no base: the table adds no line about one.
    assert summary["base"] is None
    table = format_summary({"gradient": summary}).splitlines()
    assert len(table) == 1 + 1 + 2 * len(betas) + 1 and "swept on" not in table[-1]


def test_cli_sweep_writes_the_summary_of_its_records(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["attack", "--model", "digits-cnn", "--data", "digits", "--method", "gradient"]
    assert main([*argv, "-n", "4", "--steps", "10", "--out", str(out), "--no-progress"]) == 0
    sweep = ["sweep", str(out), "--betas", "1,20", "--smoothgrad-n", "2", "--no-progress"]
    assert main([*sweep, "--min-fidelity", "0.5"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "sweep_summary.json").read_text())["gradient"]
    records = read_jsonl(out / "sweep.jsonl")
    for defense, key in (("beta_smooth", "betas"), ("smoothgrad", "smoothgrad")):
        for beta in (1.0, 20.0):
            mine = [r for r in records if r["defense"] == defense and r["beta"] == beta]
            cell = summary[key][f"{beta:g}"]
            for m in ("pcc", "ssim"):
                robust = np.median([r[f"adv_vs_clean_{m}"] for r in mine])
                assert cell[f"robustness_{m}"] == pytest.approx(robust)
                assert cell[f"fidelity_{m}"] == pytest.approx(
                    np.median([r[f"clean_vs_orig_{m}"] for r in mine])
                )
    attack = read_jsonl(out / "results.jsonl")
    # The sweep's undefended row is the attack's own result: attacked map vs original map.
    assert summary["undefended"]["robustness_pcc"] == pytest.approx(
        np.median([r["expl_pcc_orig"] for r in attack]), abs=1e-5
    )
    plain = summary["undefended"]["robustness_pcc"]
    assert summary["recommended_beta"] == recommend_beta(summary["betas"], 0.5, plain)
    verdict = [line for line in printed.splitlines() if line.startswith("gradient: ")]
    rec = summary["recommended_beta"]
    if rec is None:
        assert verdict == [
            "gradient: no beta in the sweep has median fidelity >= 0.5; none recommended"
        ]
    else:
        robust = summary["betas"][f"{rec:g}"]["robustness_pcc"]
        plain = summary["undefended"]["robustness_pcc"]
        assert len(verdict) == 1 and verdict[0].startswith(
            f"gradient: recommended beta {rec:g} (most robust with median fidelity >= 0.5): "
            f"robustness {robust:.3f} vs {plain:.3f} undefended, "
        )


@pytest.mark.parametrize("shown", [True, False])
def test_calibrate_beta_shows_its_progress_when_asked(shown, capsys):
    x = bs.load_data("digits", split="train")[0][:2]
    model = bs.load_model("digits-cnn")
    calibrate_beta(model, x, betas=[1.0, 5.0], steps=3, progress=shown)
    err = capsys.readouterr().err
    # tqdm's own bars: the attack's steps, then one tick per beta of the sweep.
    assert ("gradient targeted:" in err and "defense sweep: 100%" in err and "2/2" in err) == shown
    assert bool(err) == shown


def test_explain_beta_auto_records_the_calibrated_beta(tmp_path):
    out = tmp_path / "run"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--method", "beta_smooth"]
    assert main([*argv, "--beta", "auto", "-n", "2", "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    found = config["beta_auto"]
    chosen = config["beta_smooth_beta"]
    assert config["beta"] == "auto" and chosen == found["beta"]
    if found["recommended"]:
        assert chosen == recommend_beta(found["betas"], found["min_fidelity"])
    model = bs.load_model("digits-cnn")
    x = bs.load_data("digits")[0][:2]
    with np.load(out / "arrays" / "beta_smooth-0.npz") as saved:
        saved_map = torch.from_numpy(saved["map"])
    expected = bs.heatmap(bs.explain(model, x, "beta_smooth", beta=chosen))
    torch.testing.assert_close(saved_map, expected)


def test_attack_on_imagenet_normalised_inputs_takes_the_papers_steps_and_weights():
    # On the ImageNet box ((0 - mean) / std, (1 - mean) / std) per channel and
    # with 1000 classes the defaults are the paper's own: lr 1e-3 per 1500
    # gradient steps (3 steps: 500 times as long) and w_o = 1e6.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    box = ((0 - mean) / std, (1 - mean) / std)
    net = plain_cnn(seed=5, channels=3, classes=1000)
    x = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - mean) / std
    target = bs.heatmap(bs.explain(net, x, "gradient")).flip(0)

    def history(**kw):
        return bs.manipulate(
            net, x, target, "gradient", data_range=box, steps=3, check_every=1, **kw
        ).history

    paper = {"lr": 1e-3 * 1500 / 3, "weights": (default_weights(16, 16)[0], 1e6)}
    torch.testing.assert_close(history(), history(**paper))
    assert not torch.equal(history(), history(lr=1e-3 / 3))


class _Normalise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


@pytest.mark.parametrize("goal", ["topk", "center"])
def test_untargeted_attack_on_normalised_inputs_is_the_attack_on_pixels(goal):
    # With one std for all channels the maps of the normalised model and of
    # the same model on [0, 1] pixels differ by a constant factor, and signed
    # steps do not see it: eps = 8/255 of each channel's range must give the
    # same pixels, and the input change must be reported in pixel units.
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), 0.25
    net = plain_cnn(seed=3, channels=3)
    on_pixels = torch.nn.Sequential(_Normalise(mean, std), net)
    raw = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    box = ((0 - mean) / std, (1 - mean) / std)
    options = {"goal": goal, "eps": 8 / 255, "steps": 12}
    pixels = bs.manipulate(on_pixels, raw, None, "gradient", **options)
    normalised = bs.manipulate(net, (raw - mean) / std, None, "gradient", data_range=box, **options)
    torch.testing.assert_close(normalised.x_adv * std + mean, pixels.x_adv, atol=1e-5, rtol=0)
    change = (pixels.x_adv - raw).flatten(1)
    for result in (pixels, normalised):
        torch.testing.assert_close(result.metrics["input_mse"], change.square().mean(1))
        torch.testing.assert_close(result.metrics["input_max_change"], change.abs().amax(1))
    assert float(change.abs().max()) <= 8 / 255 + 1e-6
    assert float(change.abs().max()) > 4 / 255


def test_targeted_attack_reports_the_input_change_in_pixel_units():
    mean, std, low, high = box()
    net = plain_cnn(seed=4, channels=3)
    x = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) - mean) / std
    target = bs.heatmap(bs.explain(net, x, "gradient")).flip(0)
    result = bs.manipulate(net, x, target, "gradient", data_range=(low, high), steps=5)
    change = ((result.x_adv - x) * std).flatten(1)
    torch.testing.assert_close(result.metrics["input_mse"], change.square().mean(1))
    torch.testing.assert_close(result.metrics["input_max_change"], change.abs().amax(1))
    # input_pcc: x_adv against x over every value of all three channels, by numpy.
    a, b = result.x_adv.flatten(1).double().numpy(), x.flatten(1).double().numpy()
    pcc = [np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)]
    np.testing.assert_allclose(result.metrics["input_pcc"].numpy(), pcc, atol=1e-5)


def test_demo_on_a_normalised_model_uses_its_box(user_files, tmp_path, capsys):
    # The demo takes --mean/--std like attack: LRP's z^B rule gets the true
    # box (Zennit's map) and the attack clamps every channel to its interval.
    model_file, data_file, raw = user_files
    out = tmp_path / "demo"
    argv = ["demo", "--model", f"{model_file}:net", "--data", str(data_file), "--quick"]
    argv += ["--mean", *map(str, MEAN), "--std", *map(str, STD), "-n", "6", "--steps", "2"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    # As attack and explain, data of fewer images than -n: one notice, the number used
    # in config.json, and a report that holds a finished run (it compared 4 results per
    # method with the asked-for 6).
    notice = f"betasmooth demo: {data_file} holds only 4 images; using all 4 (asked for 6)"
    assert capsys.readouterr().err.count(notice) == 1
    assert "not finished" not in (out / "report.html").read_text()
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({r["index"] for r in results}) == [0, 1, 2, 3]
    mean, std, low, high = box()
    with np.load(out / "arrays" / "explain-lrp-0.npz") as saved:
        x, saved_map = torch.from_numpy(saved["x"]).double(), torch.from_numpy(saved["map"])
    torch.testing.assert_close(x.float(), (raw - mean) / std)
    net = bs.load_model(f"{model_file}:net").double()
    target = net(x).argmax(1)
    r = zennit_lrp(net, x.clone(), target, low.double().expand_as(x), high.double().expand_as(x))
    expected = r.abs().sum(1) / r.abs().sum((1, 2, 3)).view(-1, 1, 1)
    torch.testing.assert_close(saved_map.double(), expected, rtol=1e-5, atol=1e-8)
    with np.load(out / "arrays" / "gradient-0.npz") as saved:
        pixels = torch.from_numpy(saved["x_adv"]) * std + mean
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    config = json.loads((out / "config.json").read_text())
    assert (config["mean"], config["std"], config["n"]) == (MEAN, STD, 4)


def test_beta_auto_without_held_out_images_says_so_and_calibrates_on_the_last(
    user_files, tmp_path, capsys
):
    # Four images, all explained: nothing is held out, and the run must say
    # that the calibration saw the explained images.
    model_file, data_file, raw = user_files
    out = tmp_path / "run"
    argv = ["explain", "--model", f"{model_file}:net", "--data", str(data_file), "-n", "4"]
    argv += ["--mean", *map(str, MEAN), "--std", *map(str, STD), "--method", "beta_smooth"]
    assert main([*argv, "--beta", "auto", "--out", str(out), "--no-progress"]) == 0
    assert "calibrating beta on 4 images that are also explained" in capsys.readouterr().out
    found = json.loads((out / "config.json").read_text())["beta_auto"]
    assert "also explained" in found.pop("images")
    assert found.pop("method") == "gradient"
    mean, std, low, high = box()
    net = bs.load_model(f"{model_file}:net")
    expected = calibrate_beta(
        net, (raw - mean) / std, "gradient", steps=100, data_range=(low, high)
    )
    assert found == json.loads(json.dumps(expected.record()))


def test_cli_integrated_gradients_start_from_black_on_normalised_data(user_files, tmp_path):
    # Zero in normalised units is the mean colour; the run starts from the
    # black image (0 in pixels), as it does on [0, 1] data. Oracle: Captum.
    from captum.attr import IntegratedGradients

    model_file, data_file, raw = user_files
    out = tmp_path / "run"
    _explain_normalised(model_file, data_file, "integrated_gradients", out)
    mean, std, low, high = box()
    net = bs.load_model(f"{model_file}:net").double()
    x = ((raw - mean) / std).double()
    target = net(x).argmax(1)
    black = low.double().expand_as(x)
    attribution = IntegratedGradients(net).attribute(x, black, target=target, n_steps=50)
    expected = attribution.abs().sum(1) / attribution.abs().sum((1, 2, 3)).view(-1, 1, 1)
    with np.load(out / "arrays" / "integrated_gradients-0.npz") as saved:
        saved_map = torch.from_numpy(saved["map"]).double()
    torch.testing.assert_close(saved_map, expected, rtol=1e-4, atol=1e-6)


def test_an_option_given_to_integrated_gradients_keeps_its_black_start(user_files, tmp_path):
    # --option integrated_gradients.steps=... is put over the data's options, not in
    # their place: the path still starts from black, not from the mean colour (0).
    model_file, data_file, raw = user_files
    out = tmp_path / "run"
    argv = ["explain", "--model", f"{model_file}:net", "--data", str(data_file), "--no-progress"]
    argv += ["--mean", *map(str, MEAN), "--std", *map(str, STD)]
    argv += ["--method", "integrated_gradients", "--option", "integrated_gradients.steps=8"]
    assert main([*argv, "--out", str(out)]) == 0
    mean, std, low, _ = box()
    net = bs.load_model(f"{model_file}:net").double()
    x = ((raw - mean) / std).double()
    target = net(x).argmax(1)
    black, grey = (
        bs.heatmap(bs.explain(net, x, "integrated_gradients", target, steps=8, baseline=b))
        for b in (low.double(), None)
    )
    with np.load(out / "arrays" / "integrated_gradients-0.npz") as saved:
        saved_map = torch.from_numpy(saved["map"]).double()
    torch.testing.assert_close(saved_map, black, rtol=1e-4, atol=1e-6)
    assert (saved_map - grey).abs().max() > 1e-3


def test_cli_captum_methods_start_from_black_on_normalised_data(user_files, tmp_path):
    # Captum's default baseline 0 is the mean colour of normalised data; the
    # command line gives its methods the black image, as integrated_gradients.
    from captum.attr import FeatureAblation, IntegratedGradients

    model_file, data_file, _ = user_files
    out = tmp_path / "run"
    methods = ["integrated_gradients", "captum:IntegratedGradients", "captum:FeatureAblation"]
    _explain_normalised(model_file, data_file, ",".join(methods), out)
    maps = {}
    for method in methods:
        with np.load(RunDir(out).arrays_file(method, 0)) as saved:
            maps[method], x = saved["map"], torch.from_numpy(saved["x"]).double()
    net = bs.load_model(f"{model_file}:net").double()
    target = net(x).argmax(1)
    _, _, low, _ = box()

    def stored(baselines, explainer=IntegratedGradients, **options):
        a = explainer(net).attribute(x, baselines=baselines, target=target, **options)
        return (a.abs().sum(1) / a.abs().sum((1, 2, 3)).view(-1, 1, 1)).detach().numpy()

    black = stored(low.double().expand(1, *x.shape[1:]), n_steps=50)
    np.testing.assert_allclose(maps["captum:IntegratedGradients"], black, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(maps["integrated_gradients"], black, rtol=1e-4, atol=1e-7)
    assert np.abs(stored(0.0, n_steps=50) - black).max() > 1e-2  # the mean colour: another map
    # FeatureAblation takes **kwargs too, so its options are not listed: still black.
    ablated = stored(low.double().expand(1, *x.shape[1:]), FeatureAblation)
    np.testing.assert_allclose(maps["captum:FeatureAblation"], ablated, rtol=1e-4, atol=1e-7)
    assert np.abs(stored(0.0, FeatureAblation) - ablated).max() > 1e-2
    # Only methods that take baselines get them.
    assert set(range_options(low, 1.0, ["gradient", "lrp", "captum:Saliency", *methods])) == {
        "lrp",
        "smoothgrad",
        "integrated_gradients",
        *methods[1:],
    }


def test_a_smoothing_of_a_captum_base_gets_the_data_range_as_its_baselines():
    # with_base_range fills the base's range option as range_options gives it to
    # the base itself: a Captum base that takes baselines gets the low corner.
    from betasmooth.explain import with_base_range

    low = torch.tensor([-1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    high = low + 2.0
    for method in ("smoothgrad", "beta_smooth"):
        options = with_base_range(method, {"base": "captum:IntegratedGradients"}, low, high)
        assert options["base_options"].keys() == {"baselines"}
        assert options["base_options"]["baselines"] is low
        assert "base_options" not in with_base_range(method, {"base": "captum:Saliency"}, low, high)
    # An option of the base given among the smoothing's own wins: no black fills in for it.
    given = {"base": "integrated_gradients", "baseline": 0.3}
    assert with_base_range("smoothgrad", given, low, high) == given
    assert with_base_range("smoothgrad", {"base": "integrated_gradients"}, low, high)[
        "base_options"
    ] == {"baseline": low}


def test_captum_takes_one_baseline_colour_per_channel(user_files):
    # GradientShap draws from its baselines and wants their item shape exactly;
    # it draws with numpy's and torch's generators.
    from captum.attr import GradientShap

    net, x, low, _ = _normalised_double(user_files)
    target = net(x).argmax(1)
    torch.manual_seed(0), np.random.seed(0)
    # (C, 1, 1) in float32 on float64 images: one item, in the images' dtype.
    ours = bs.explain(net, x, "captum:GradientShap", target, baselines=low[0].float(), n_samples=3)
    torch.manual_seed(0), np.random.seed(0)
    theirs = GradientShap(net).attribute(
        x, baselines=low.expand(1, *x.shape[1:]), target=target, n_samples=3
    )
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14)


def test_curvature_with_the_data_range_is_per_pixel_value(user_files, tmp_path):
    net, x, low, high = _normalised_double(user_files)
    mean, std, _, _ = box()
    pixels = x * std.double() + mean.double()
    smoothed = bs.smooth(net, 5.0)
    ours = bs.curvature(smoothed, x, data_range=(low, high), seed=[0, 1, 2, 3])
    by_hand = bs.curvature(
        bs.smooth(torch.nn.Sequential(_Normalise(mean.double(), std.double()), net), 5.0),
        pixels,
        seed=[0, 1, 2, 3],
    )
    for key in ours:
        torch.testing.assert_close(ours[key], by_hand[key], rtol=1e-7, atol=1e-12)
    # Theorem 1's check measures the same way, distances included.
    from betasmooth.geometry import theorem1_check

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    x_adv = x + 0.05 * noise
    check = theorem1_check(net, x, x_adv, beta=5.0, samples=3, data_range=(low, high))
    pixel_net = torch.nn.Sequential(_Normalise(mean.double(), std.double()), net)
    expected = theorem1_check(
        pixel_net, pixels, x_adv * std.double() + mean.double(), beta=5.0, samples=3
    )
    for key in check:
        torch.testing.assert_close(check[key], expected[key], rtol=1e-7, atol=1e-12)
    model_units = bs.curvature(smoothed, x, seed=[0, 1, 2, 3])
    assert (model_units["gradient_norm"] < 0.5 * ours["gradient_norm"]).all()  # std <= 0.3
    # The command line measures the same way.
    model_file, data_file, _ = user_files
    argv = ["curvature", "--model", f"{model_file}:net", "--data", str(data_file)]
    argv += ["--mean", *map(str, MEAN), "--std", *map(str, STD), "--betas", "5", "-n", "4"]
    assert main([*argv, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["units"].startswith("per pixel value in [0, 1]")
    rows = sorted(read_jsonl(tmp_path / "c" / "results.jsonl"), key=lambda r: r["index"])
    stored = torch.tensor([r["gradient_norm"] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(stored, by_hand["gradient_norm"], rtol=1e-4, atol=0)


def test_a_base_lrp_of_beta_smooth_gets_the_datas_box_in_runs(tmp_path):
    # explain's map and the attack's target map: both with the box of the data.
    from betasmooth.attack import ATTACK_DEFAULTS

    data = bs.load_data("digits", mean=0.5, std=0.5)
    model = bs.load_model("digits-cnn")
    common = ["--model", "digits-cnn", "--data", "digits", "-n", "2", "--mean", "0.5"]
    common += ["--std", "0.5", "--method", "beta_smooth", "--option", "beta_smooth.base=lrp"]
    assert main(["explain", *common, "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    assert (
        main(["attack", *common, "--steps", "1", "--out", str(tmp_path / "a"), "--no-progress"])
        == 0
    )
    box = {"low": data.low, "high": data.high}
    with np.load(RunDir(tmp_path / "e").arrays_file("beta_smooth", 0)) as saved:
        x, stored = torch.from_numpy(saved["x"]), saved["map"]
    expected = bs.heatmap(bs.explain(model, x, "beta_smooth", base="lrp", **box)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-6)
    beta = ATTACK_DEFAULTS["beta_smooth"]["options"]["beta"]
    with np.load(RunDir(tmp_path / "a").arrays_file("beta_smooth", 0)) as saved:
        xt = torch.from_numpy(saved["x"])[torch.from_numpy(saved["target_index"]).long()]
        target = saved["map_target"]
    expected = bs.explain(model, xt, "beta_smooth", base="lrp", beta=beta, **box)
    np.testing.assert_allclose(target, bs.heatmap(expected).numpy(), rtol=0, atol=1e-6)
    default = bs.heatmap(bs.explain(model, xt, "beta_smooth", base="lrp", beta=beta)).numpy()
    assert np.abs(target - default).max() > 1e-3  # the box matters here


def test_resume_of_a_beta_auto_run_keeps_its_beta_without_calibrating(tmp_path, monkeypatch):
    x, y = bs.load_data("digits")
    np.savez(tmp_path / "six.npz", x=x[:6].numpy(), y=y[:6].numpy())
    monkeypatch.chdir(tmp_path)
    argv = ["explain", "--model", "digits-cnn", "--method", "beta_smooth", "--beta", "auto"]
    argv += ["-n", "5", "--batch-size", "2", "--out", "run", "--no-progress"]
    assert main([*argv, "--data", "six.npz"]) == 0
    config = json.loads(Path("run/config.json").read_text())
    done = Path("run/results.jsonl").read_text().splitlines()
    maps = {}
    for start in (0, 2, 4):
        with np.load(f"run/arrays/beta_smooth-{start}.npz") as saved:
            maps[start] = saved["map"]
    # Killed after its first batch: the rest must be smoothed with the same beta.
    Path("run/results.jsonl").write_text("\n".join(done[:2]) + "\n")
    for start in (2, 4):
        Path(f"run/arrays/beta_smooth-{start}.npz").unlink()

    def calibrate_beta(*args, **kwargs):
        raise AssertionError("a resumed run must not calibrate again")

    monkeypatch.setattr("betasmooth.cli.calibrate_beta", calibrate_beta)
    # The same file, spelt another way: its calibration record named the spelling.
    assert main([*argv, "--data", "./six.npz", "--resume"]) == 0
    assert json.loads(Path("run/config.json").read_text())["beta_auto"] == config["beta_auto"]
    assert Path("run/results.jsonl").read_text().count("\n") == 5
    for start, expected in maps.items():
        with np.load(f"run/arrays/beta_smooth-{start}.npz") as saved:
            np.testing.assert_array_equal(saved["map"], expected)


FACTORY_WITH_METHOD = (
    FACTORY
    + """
from betasmooth.explain import register


@register("from_black")
def from_black(model, x, target, *, create_graph=False, black=0.0):
    return x - torch.as_tensor(black, dtype=x.dtype)


# The data's range reaches a registered method as it reaches the built-in ones.
from_black.range_options = lambda low, high: {"black": low}
"""
)


def test_a_registered_method_takes_the_data_range_it_asks_for(user_files, tmp_path):
    from betasmooth.explain import METHODS

    model_file, data_file, raw = user_files
    model_file.write_text(FACTORY_WITH_METHOD)
    out = tmp_path / "run"
    try:
        _explain_normalised(model_file, data_file, "from_black", out)
        _, _, low, high = box()
        assert range_options(low, high)["from_black"]["black"] is low
    finally:
        METHODS.pop("from_black", None)
    # Its map is that of x - black with black the low corner: the raw image itself
    # over the std, where black=0 (the mean colour) would give (raw - mean) / std.
    mean, std, _, _ = box()
    with np.load(RunDir(out).arrays_file("from_black", 0)) as saved:
        saved_map = torch.from_numpy(saved["map"])
    torch.testing.assert_close(saved_map, bs.heatmap(raw / std), rtol=1e-4, atol=1e-7)
    assert (saved_map - bs.heatmap((raw - mean) / std)).abs().max() > 1e-3
