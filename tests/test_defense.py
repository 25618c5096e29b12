"""The defense sweep: beta-smoothing and SmoothGrad against recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import betasmooth as bs
from betasmooth.defense import matched_sigma
from betasmooth.explain.gradient import predict
from betasmooth.recommend import recommend_beta, verdict
from betasmooth.validate import item_seeds
from nets import maps_of, plain_cnn, relu_replaced, targets_of


def test_undefended_scores_explain_the_label_at_x(digits_cnn, digits):
    # x_adv of other predicted classes (the batch reversed): the undefended map
    # explains the label predicted at x, as the defended maps do, not the class
    # predicted at x_adv; recomputed with explain and compare.
    net, x = digits_cnn, digits[0][:4]
    x_adv = x.flip(0)
    label = predict(net, x)
    assert not torch.equal(predict(net, x_adv), label)
    sweep = bs.defense_sweep(net, x, x_adv, targets_of(net, x), "gradient", [2.0], smoothgrad_n=2)
    plain = bs.heatmap(bs.explain(net, x_adv, "gradient", label))
    want = bs.compare(plain, bs.heatmap(bs.explain(net, x, "gradient", label)))
    for row in sweep.rows:
        for m in ("pcc", "mse", "topk"):
            assert row[f"undefended_{m}"] == pytest.approx(float(want[m][row["index"]]), abs=1e-6)


def test_undefended_topk_scores_take_the_sweeps_k(digits_cnn, digits):
    # k=40: the undefended topk score, as the defended ones, is the share of the
    # top 40 pixels the maps of x_adv and x have in common, not of the default 102.
    net, x = digits_cnn, digits[0][:4]
    x_adv = x.flip(0)
    label = predict(net, x)
    sweep = bs.defense_sweep(
        net, x, x_adv, targets_of(net, x), "gradient", [2.0], smoothgrad_n=2, k=40
    )
    plain = bs.heatmap(bs.explain(net, x_adv, "gradient", label)).detach().numpy()
    orig = bs.heatmap(bs.explain(net, x, "gradient", label)).detach().numpy()

    def top(m, k):
        return set(np.argsort(-m.ravel(), kind="stable")[:k].tolist())

    differs = 0
    for row in sweep.rows:
        i = row["index"]
        want = len(top(plain[i], 40) & top(orig[i], 40)) / 40
        assert row["undefended_topk"] == pytest.approx(want, abs=1e-6)
        differs += want != len(top(plain[i], 102) & top(orig[i], 102)) / 102
    assert differs  # the default size gives other scores on these maps


@pytest.mark.parametrize(
    ("defense", "why"),
    [
        (lambda model, xs, method, label, beta: xs[:, 0], "got an unexpected keyword argument"),
        # beta is passed fifth by position: every keyword does not make up for it.
        (lambda model, xs, method, label, **_: xs[:, 0], "too many positional arguments"),
    ],
    ids=["no keywords", "no beta"],
)
def test_a_defense_of_another_form_is_refused_before_the_sweep(monkeypatch, defense, why):
    # Called as the sweep calls it, a defense that does not take those arguments would
    # fail in the middle of a sweep; the one that takes them all passes.
    from betasmooth.defense import DEFENSES, check_defenses
    from betasmooth.validate import InputError

    monkeypatch.setitem(DEFENSES, "bare", defense)
    monkeypatch.setitem(DEFENSES, "open", lambda model, xs, method, label, beta, **_: xs[:, 0])
    assert check_defenses(["open"]) == ["open"]
    with pytest.raises(InputError) as err:
        check_defenses(["beta_smooth", "bare"])
    assert str(err.value).startswith(
        "defense 'bare' cannot be called as fn(model, xs, method, label, beta, *, sigma, n, "
        f"seed, input_range, base_options) ({why}"
    )
    assert str(err.value).endswith("); expected that form")


def test_a_defense_named_beta_is_refused_as_its_maps_would_be_beta_smooths(monkeypatch):
    # Its maps would be maps_beta in a sweep's arrays, the key of beta_smooth's maps.
    from betasmooth.defense import DEFENSES, check_defenses
    from betasmooth.validate import InputError

    monkeypatch.setitem(DEFENSES, "beta", DEFENSES["smoothgrad"])
    monkeypatch.setitem(DEFENSES, "beta_blur", DEFENSES["smoothgrad"])
    assert check_defenses(["beta_blur", "beta_smooth"]) == ["beta_blur", "beta_smooth"]
    with pytest.raises(InputError) as err:
        check_defenses(["beta_smooth", "beta"])
    assert str(err.value) == (
        "defense 'beta' has the name of beta_smooth's maps in a sweep's arrays (maps_beta); "
        "expected another name"
    )


def test_matched_smoothgrad_noise_does_not_depend_on_the_data_range(small):
    # Without smoothgrad_sigmas, SmoothGrad's noise is matched to beta in input
    # units (sigma = pi / (sqrt(3) beta)): the gradient's sweep is the same for
    # any data range that holds the images.
    net, x = small
    target = targets_of(net, x)

    def rows(data_range):
        sweep = bs.defense_sweep(
            net, x, x.flip(0), target, "gradient", [2.0], smoothgrad_n=3, data_range=data_range
        )
        return [{k: v for k, v in r.items() if k != "seconds"} for r in sweep.rows]

    assert rows((-1.0, 2.0)) == rows((0.0, 1.0))


def test_smoothgrad_sigmas_are_fractions_of_each_channels_range():
    # Given sigmas are fractions of each channel's range (1, 2 and 4 wide here), as
    # explain's smoothgrad takes a per-channel input_range; the clean map of each
    # image is explain's with the image's own seed (item_seeds), recomputed.
    net = plain_cnn(seed=4, channels=3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    box = (torch.zeros(1, 3, 1, 1), torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1))
    label = predict(net, x)
    target = targets_of(net, x)
    sweep = bs.defense_sweep(
        net,
        x,
        x.flip(0),
        target,
        "gradient",
        [1.0],
        smoothgrad_sigmas=[0.3],
        smoothgrad_n=4,
        defenses=["smoothgrad"],
        data_range=box,
        seed=7,
    )
    clean = bs.heatmap(
        bs.explain(
            net,
            x,
            "smoothgrad",
            label,
            base="gradient",
            n=4,
            sigma=0.3,
            noise="logistic",
            input_range=box[1] - box[0],
            seed=item_seeds(7, 2),
        )
    )
    want = bs.compare(clean, bs.heatmap(bs.explain(net, x, "gradient", label)))
    for row in sweep.rows:
        assert row["clean_vs_orig_pcc"] == pytest.approx(float(want["pcc"][row["index"]]), abs=1e-5)
        assert row["clean_vs_orig_mse"] == pytest.approx(float(want["mse"][row["index"]]), rel=1e-4)


def test_defense_sweep_equals_recomputation(small):
    net, x = small
    target = targets_of(net, x)
    x_adv = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(
        0, 1
    )
    betas = [0.5, 2.0]
    seeds = [7, 8, 9, 10]
    sweep = bs.defense_sweep(net, x, x_adv, target, "gradient", betas, smoothgrad_n=3, seed=seeds)
    rows = sweep.records()
    assert len(rows) == 2 * len(betas) * x.shape[0]
    label = net(x).argmax(1)
    orig = maps_of(net, x)
    both = torch.cat([x_adv, x])
    for beta in betas:
        smooth = maps_of(net, both, "beta_smooth", target=label.repeat(2), beta=beta)
        sigma = math.pi / (math.sqrt(3) * beta)
        noisy = maps_of(
            net,
            both,
            "smoothgrad",
            target=label.repeat(2),
            n=3,
            sigma=sigma,
            noise="logistic",
            input_range=1.0,
            seed=seeds + seeds,
        )
        for defense, maps in (("beta_smooth", smooth), ("smoothgrad", noisy)):
            adv, clean = maps.chunk(2)
            expected = {
                "adv_vs_orig": bs.compare(adv, orig),
                "adv_vs_target": bs.compare(adv, target),
                "clean_vs_orig": bs.compare(clean, orig),
                "clean_vs_target": bs.compare(clean, target),
            }
            mine = [r for r in rows if r["defense"] == defense and r["beta"] == beta]
            assert [r["index"] for r in mine] == [0, 1, 2, 3]
            for row in mine:
                assert row["sigma"] == (pytest.approx(sigma) if defense == "smoothgrad" else None)
                assert row["seconds"] > 0
                for prefix, values in expected.items():
                    for name, v in values.items():
                        assert row[f"{prefix}_{name}"] == pytest.approx(
                            float(v[row["index"]]), abs=1e-6
                        )
    for med in sweep.medians():
        group = [r for r in rows if r["defense"] == med["defense"] and r["beta"] == med["beta"]]
        assert med["n"] == len(group) == x.shape[0]
        assert med["adv_vs_orig_pcc"] == pytest.approx(
            np.median([r["adv_vs_orig_pcc"] for r in group])
        )


def test_each_image_of_a_sweep_is_explained_by_its_own_prediction(digits, digits_cnn):
    # x_adv and x go through the defenses as one batch with the labels repeated;
    # the small net predicts one class everywhere, so a mix-up of labels went unseen.
    x = digits[0][:4]
    label = predict(digits_cnn, x)
    assert len(set(label.tolist())) == 4
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_adv = (x + 0.02 * noise).clamp(0, 1)
    seeds = [3, 4, 5, 6]
    target = targets_of(digits_cnn, x)
    sweep = bs.defense_sweep(
        digits_cnn, x, x_adv, target, "gradient", [2.0], smoothgrad_n=2, seed=seeds
    )
    sigma = math.pi / (math.sqrt(3) * 2.0)
    for i in range(4):
        one = {"target": label[i : i + 1]}
        smooth = [
            maps_of(digits_cnn, v[i : i + 1], "beta_smooth", beta=2.0, **one) for v in (x_adv, x)
        ]
        noisy = [
            maps_of(
                digits_cnn,
                v[i : i + 1],
                "smoothgrad",
                n=2,
                sigma=sigma,
                noise="logistic",
                input_range=1.0,
                seed=seeds[i],
                **one,
            )
            for v in (x_adv, x)
        ]
        for defense, expected in (("beta_smooth", smooth), ("smoothgrad", noisy)):
            for got, want in zip(sweep.maps[(defense, 2.0)], expected):
                torch.testing.assert_close(got[i : i + 1], want, rtol=1e-5, atol=1e-7)


def test_given_smoothgrad_sigmas_are_fractions_of_the_whole_data_range(small):
    # The noise of a given sigma is sigma * (high - low); a range whose low end is not 0
    # tells the width from the high end.
    net, x = small
    x_adv = (x + 0.05).clamp(0, 1)
    seeds = [1, 2, 3, 4]
    sweep = bs.defense_sweep(
        net,
        x,
        x_adv,
        targets_of(net, x),
        "gradient",
        [1.0],
        smoothgrad_sigmas=[0.1],
        smoothgrad_n=3,
        defenses=["smoothgrad"],
        data_range=(-1.0, 2.0),
        seed=seeds,
    )
    label = net(x).argmax(1)
    for got, v in zip(sweep.maps[("smoothgrad", 1.0)], (x_adv, x)):
        want = maps_of(
            net,
            v,
            "smoothgrad",
            target=label,
            n=3,
            sigma=0.1,
            noise="logistic",
            input_range=3.0,
            seed=seeds,
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert {r["sigma"] for r in sweep.records()} == {0.1}


@pytest.mark.parametrize("method", ["gradient", "lrp"])
def test_a_sweep_where_beta_smoothing_changes_nothing_recommends_no_beta(small, method):
    # A GELU network has no ReLU to replace: every beta gives the undefended maps back,
    # which the sweep recommended (beta 5, "about as robust") as a defense. LRP's maps
    # of one image differed by 1e-7 between a batch of x and one of x_adv and x.
    import warnings

    net, x = small
    gelu = relu_replaced(net, nn.GELU)
    target = targets_of(gelu, x)
    x_adv = bs.manipulate(gelu, x, target, method, steps=3).x_adv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # beta-smoothing changed nothing: said, and tested
        sweep = bs.defense_sweep(gelu, x, x_adv, target, method, [1.0, 5.0], smoothgrad_n=2)
    rows = sweep.records()
    plain = bs.heatmap(bs.explain(gelu, x, method))
    for beta in (1.0, 5.0):
        torch.testing.assert_close(sweep.maps[("beta_smooth", beta)][1], plain)
    assert {r["changed"] for r in rows if r["defense"] == "beta_smooth"} == {False}
    assert {r["changed"] for r in rows if r["defense"] == "smoothgrad"} == {True}
    summary = sweep.summary()
    assert summary["recommended_beta"] is None
    assert verdict(summary) == (
        "beta-smoothing changed no map at any beta (the model calls no ReLU that it replaces, or "
        "each beta is so large that softplus rounds to ReLU); none recommended"
    )
    # On the ReLU network every beta changes the maps, and one is recommended.
    relu = bs.defense_sweep(net, x, x, targets_of(net, x), "gradient", [5.0], smoothgrad_n=2)
    assert {r["changed"] for r in relu.records()} == {True}


def test_a_sweep_of_an_attack_that_changed_no_image_recommends_no_beta(small):
    # x_adv == x: robustness 1 at every beta and undefended, which recommended a beta
    # ("about as robust") against an attack that had done nothing.
    net, x = small
    target = targets_of(net, x)
    same = bs.defense_sweep(net, x, x.clone(), target, "gradient", [1.0, 5.0], smoothgrad_n=2)
    assert {r["attacked"] for r in same.records()} == {False}
    summary = same.summary()
    assert summary["attacked"] == 0 and summary["recommended_beta"] is None
    assert verdict(summary) == (
        "the attack changed no image, so no defense has anything to undo; none recommended"
    )
    # One image moved: it counts, and the betas are judged as before.
    x_adv = x.clone()
    x_adv[1] = (x_adv[1] + 0.05).clamp(0, 1)
    moved = bs.defense_sweep(net, x, x_adv, target, "gradient", [1.0, 5.0], smoothgrad_n=2)
    assert [r["attacked"] for r in moved.records()][: len(x)] == [
        not torch.equal(a, b) for a, b in zip(x_adv, x)
    ]
    summary = moved.summary(min_fidelity=0.3)
    assert summary["attacked"] == 1
    assert summary["recommended_beta"] == recommend_beta(summary["betas"], 0.3) is not None


def test_the_sweep_says_how_much_of_the_attacks_gain_each_beta_leaves(small):
    # "more robust" alone read as a defense where most of the pull to the target stayed.
    net, x = small
    target = targets_of(net, x)
    x_adv = bs.manipulate(net, x, target, "gradient", steps=20).x_adv
    sweep = bs.defense_sweep(net, x, x_adv, target, "gradient", [1.0, 5.0], smoothgrad_n=2)
    rows = sweep.records()
    plain = maps_of(net, torch.cat([x_adv, x]), target=net(x).argmax(1).repeat(2))
    for i, r in enumerate(rows[: len(x)]):
        after = stats.pearsonr(plain[i].flatten().numpy(), target[i].flatten().numpy())[0]
        before = stats.pearsonr(plain[len(x) + i].flatten().numpy(), target[i].flatten().numpy())[0]
        assert r["undefended_target_pcc"] == pytest.approx(after, abs=1e-5)
        assert r["undefended_before_pcc"] == pytest.approx(before, abs=1e-5)
    summary = sweep.summary(min_fidelity=0.0)

    def median(key, defense=None, beta=None):
        return np.median(
            [
                r[key]
                for r in rows
                if defense is None or (r["defense"], r["beta"]) == (defense, beta)
            ][: None if defense else len(x)]
        )

    gain = median("undefended_target_pcc") - median("undefended_before_pcc")
    assert gain > 0 and summary["undefended"]["gain_pcc"] == pytest.approx(gain)
    for defense, cells in (("beta_smooth", "betas"), ("smoothgrad", "smoothgrad")):
        for beta in (1.0, 5.0):
            left = median("adv_vs_target_pcc", defense, beta) - median(
                "clean_vs_target_pcc", defense, beta
            )
            got = summary[cells][f"{beta:g}"]["gain_left"]
            assert got == pytest.approx(left / gain)
    rec = summary["recommended_beta"]
    share = 100 * summary["betas"][f"{rec:g}"]["gain_left"]
    assert verdict(summary).endswith(
        f"; {share:.0f} % of the attack's gain in PCC to the target left"
    )


def test_a_sweep_refuses_a_beta_given_twice(small):
    # Its images were counted twice in that beta's medians.
    net, x = small
    with pytest.raises(bs.InputError, match="^betas must differ; 1 given more than once$"):
        bs.defense_sweep(net, x, x, targets_of(net, x), "gradient", [1.0, 10.0, 1], smoothgrad_n=2)


def test_defense_sweep_takes_float64_images_as_explain_does(small):
    # float64 x on a float32 model ended in torch's "Input type (double) and
    # bias type (float) should be the same".
    net, x = small
    target = targets_of(net, x)
    x_adv = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(
        0, 1
    )
    run = {"smoothgrad_n": 2, "seed": 3}
    single = bs.defense_sweep(net, x, x_adv, target, "gradient", [1.0], **run).records()
    double = bs.defense_sweep(
        net, x.double(), x_adv.double(), target, "gradient", [1.0], **run
    ).records()
    # The same maps: only the comparison with the target (kept in its own dtype) rounds apart.
    for a, b in zip(single, double):
        assert a.keys() == b.keys()
        for key in a.keys() - {"seconds"}:
            # pytest.approx takes numbers only (a label or None: compared as they are).
            want = a[key]
            if isinstance(want, float):
                want = pytest.approx(want, rel=1e-5, abs=1e-6)
            assert b[key] == want, key


def test_sweep_with_one_seed_gives_an_image_and_its_copy_the_same_draws(small):
    # An unchanged image is not an attack: every defense must see no change at all.
    net, x = small
    target = targets_of(net, x)
    sweep = bs.defense_sweep(net, x, x.clone(), target, "gradient", [2.0], smoothgrad_n=3, seed=0)
    for row in sweep.records():
        assert row["adv_vs_clean_pcc"] == pytest.approx(1.0, abs=1e-6), row["defense"]
        assert row["adv_vs_clean_mse"] == 0.0
    adv, clean = sweep.maps[("smoothgrad", 2.0)]
    torch.testing.assert_close(adv, clean, rtol=0, atol=0)
    # Each image still gets its own draws: SmoothGrad with the noise of image 0 for all
    # images would give the same maps for two equal images; the sweep does not.
    twins = x[:1].expand(2, -1, -1, -1).contiguous()
    twin = bs.defense_sweep(net, twins, twins, target[:2], "gradient", [2.0], smoothgrad_n=3)
    first, second = twin.maps[("smoothgrad", 2.0)][1]
    assert not torch.allclose(first, second)
    # Seeds per image as a numpy array are the same seeds as a list.
    as_list = bs.defense_sweep(
        net, x, x, target, "gradient", [2.0], smoothgrad_n=3, seed=[4, 5, 6, 7]
    )
    as_array = bs.defense_sweep(
        net, x, x, target, "gradient", [2.0], smoothgrad_n=3, seed=np.arange(4, 8)
    )
    torch.testing.assert_close(
        as_array.maps[("smoothgrad", 2.0)], as_list.maps[("smoothgrad", 2.0)]
    )
    # The same seed gives the same records.
    again = bs.defense_sweep(net, x, x.clone(), target, "gradient", [2.0], smoothgrad_n=3, seed=0)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in sweep.records()]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again.records()]


def test_sweep_of_a_model_in_training_mode_explains_the_deployed_model(small):
    # BatchNorm in training mode predicts from batch statistics and updates its
    # running ones; the sweep must use and leave the model as deployed.
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 10),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = small[1]
    target = targets_of(net.eval(), x)
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    eval_rows = bs.defense_sweep(net, x, x, target, "gradient", [2.0], smoothgrad_n=2).records()
    net.train()
    train_rows = bs.defense_sweep(net, x, x, target, "gradient", [2.0], smoothgrad_n=2).records()
    assert net.training
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0, msg=name)
    for a, b in zip(eval_rows, train_rows):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }


def test_sweep_with_a_seed_per_image_gives_each_image_its_own_draws(small):
    net, x = small
    target = targets_of(net, x)
    x_adv = (x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    seeds = [11, 12, 13, 14]
    whole = bs.defense_sweep(net, x, x_adv, target, "gradient", [2.0], smoothgrad_n=3, seed=seeds)
    alone = bs.defense_sweep(
        net, x[2:3], x_adv[2:3], target[2:3], "gradient", [2.0], smoothgrad_n=3, seed=seeds[2:3]
    )
    for defense in ("beta_smooth", "smoothgrad"):
        torch.testing.assert_close(
            whole.maps[(defense, 2.0)][0][2:3], alone.maps[(defense, 2.0)][0]
        )
        torch.testing.assert_close(
            whole.maps[(defense, 2.0)][1][2:3], alone.maps[(defense, 2.0)][1]
        )
    # The image and its attacked copy share their draws: SmoothGrad of x by hand.
    clean = bs.heatmap(
        bs.explain(
            net,
            x[2:3],
            "smoothgrad",
            predict(net, x[2:3]),
            n=3,
            noise="logistic",
            sigma=matched_sigma(2.0),
            input_range=1.0,
            seed=[13],
        )
    )
    torch.testing.assert_close(alone.maps[("smoothgrad", 2.0)][1], clean)


def _tiny_vit(tv):
    torch.manual_seed(0)
    vit = tv.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    ).eval()  # fmt: skip
    nn.init.normal_(vit.heads.head.weight)
    return vit


def _tiny_swin_v2(tv):
    # Its only ReLUs compute the position bias from constant coordinates.
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    torch.manual_seed(0)
    return tv.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2],
        num_classes=5, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("method", ["gradient", "lrp"])
@pytest.mark.parametrize("build", [_tiny_vit, _tiny_swin_v2], ids=["vit", "swin-v2"])
def test_a_sweep_on_a_transformer_finds_that_beta_smoothing_changes_nothing(method, build):
    # A ViT's maps of an image differed in their last bits with the override on (no
    # fused attention kernel): the sweep took beta-smoothing, which replaced nothing,
    # for a defense. Swin V2's ReLUs never see the image.
    import warnings

    tv = pytest.importorskip("torchvision")
    vit = build(tv)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = targets_of(vit, x)
    x_adv = bs.manipulate(vit, x, target, method, steps=2).x_adv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # beta-smoothing changed nothing: said
        sweep = bs.defense_sweep(
            vit, x, x_adv, target, method, [1.0, 5.0], defenses=["beta_smooth"]
        )
    assert {r["changed"] for r in sweep.records()} == {False}
    assert sweep.summary()["recommended_beta"] is None


def _undefended(model, x, x_adv, method="gradient"):
    """The sweep's undefended scores, recomputed: maps of x_adv and x explained together."""
    label = predict(model, x)
    maps = bs.heatmap(bs.explain(model, torch.cat([x_adv, x]), method, label.repeat(2)))
    return bs.compare(*maps.chunk(2))


def test_a_sweep_of_a_model_whose_batchnorm_needs_a_batch():
    # Counting the ReLUs that beta-smoothing reaches ran the model on one image,
    # which a BatchNorm without running statistics refuses.
    torch.manual_seed(18)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(144, track_running_stats=False),
        nn.Linear(144, 3),
    ).eval()  # fmt: skip
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x_adv = (x + 0.01).clamp(0, 1)
    sweep = bs.defense_sweep(net, x, x_adv, targets_of(net, x), "gradient", [1.0], smoothgrad_n=2)
    rows = sweep.records()
    assert {r["changed"] for r in rows} == {True}
    expected = _undefended(net, x, x_adv)
    for r in rows:
        assert r["undefended_pcc"] == pytest.approx(float(expected["pcc"][r["index"]]), abs=1e-6)


def test_a_sweep_of_smoothgrad_alone_on_a_traced_model():
    # beta-smoothing cannot reach a TorchScript model's ReLUs, but it was not asked for.
    net, x = plain_cnn(seed=4), torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    traced = torch.jit.trace(net.eval(), x)
    x_adv = (x + 0.01).clamp(0, 1)
    sweep = bs.defense_sweep(
        traced, x, x_adv, targets_of(net, x), "gradient", [1.0], smoothgrad_n=2,
        defenses=["smoothgrad"],
    )  # fmt: skip
    rows = sweep.records()
    assert len(rows) == 4 and {r["changed"] for r in rows} == {True}
    expected = _undefended(net, x, x_adv)
    for r in rows:
        assert r["undefended_pcc"] == pytest.approx(float(expected["pcc"][r["index"]]), abs=1e-6)


@pytest.mark.parametrize(
    ("returned", "got"),
    [
        (lambda maps: maps[:, None], "shape (8, 1, 16, 16)"),
        (lambda maps: maps[:4], "shape (4, 16, 16)"),
        (lambda maps: maps.numpy(), "ndarray"),
        (lambda maps: maps.index_fill(0, torch.tensor([5]), math.nan), "maps with NaN or inf"),
    ],
)
def test_a_registered_defense_that_returns_other_maps_is_named(small, returned, got):
    from betasmooth.defense import DEFENSES

    net, x = small

    def odd(model, xs, method, label, beta, **_):
        return returned(bs.heatmap(bs.explain(model, xs, method, label)).detach())

    DEFENSES["odd"] = odd
    try:
        with pytest.raises(bs.InputError) as info:
            bs.defense_sweep(net, x, x, bs.heatmap(x), "gradient", [1.0], defenses=["odd"])
    finally:
        DEFENSES.pop("odd")
    assert str(info.value) == (
        "defense 'odd' returned maps with NaN or inf; expected finite maps"
        if "NaN" in got
        else f"defense 'odd' returned {got}; expected maps of shape (8, 16, 16), the attacked "
        "images' then the clean ones' (2B, H, W) as a torch.Tensor"
    )


def test_changed_is_true_where_a_defense_changes_only_one_of_the_two_maps(small, monkeypatch):
    # "changed": the defense changed the map of x or of x_adv. Two registered defenses
    # give back the undefended maps but for one half, mirrored: each changed every image.
    from betasmooth.defense import DEFENSES

    net, x = small

    def mirrored(half):
        def defense(model, xs, method, label, beta, *, base_options, **_):
            maps = maps_of(model, xs, method, target=label, **(base_options or {})).detach()
            adv, clean = maps.chunk(2)
            if half == "adv":
                adv = adv.flip(-1)
            elif half == "clean":
                clean = clean.flip(-1)
            return torch.cat([adv, clean])

        return defense

    monkeypatch.setitem(DEFENSES, "mirror_adv", mirrored("adv"))
    monkeypatch.setitem(DEFENSES, "mirror_clean", mirrored("clean"))
    monkeypatch.setitem(DEFENSES, "identity", mirrored(None))
    plain = maps_of(net, x, target=predict(net, x))
    assert not any(torch.equal(m, m.flip(-1)) for m in plain)
    x_adv = (x + 0.02).clamp(0, 1)
    sweep = bs.defense_sweep(
        net, x, x_adv, targets_of(net, x), "gradient", [1.0],
        defenses=["mirror_adv", "mirror_clean", "identity"],
    )  # fmt: skip
    changed = {}
    for r in sweep.records():
        changed.setdefault(r["defense"], []).append(r["changed"])
    assert changed == {
        "mirror_adv": [True] * 4, "mirror_clean": [True] * 4, "identity": [False] * 4
    }  # fmt: skip


def test_a_registered_defenses_maps_are_kept_detached_and_timed_per_image(small, monkeypatch):
    # The clock advances 6 s inside the defense only: 4 images took 1.5 s each. The maps
    # it returns with a graph are kept without it (each beta's maps would hold theirs).
    import types

    import betasmooth.defense as defense_module

    net, x = small
    now = [100.0]

    def graphed(model, xs, method, label, beta, *, base_options, **_):
        now[0] += 6.0
        maps = maps_of(model, xs, method, target=label, **(base_options or {})).detach()
        return maps.requires_grad_(True) * 1

    monkeypatch.setitem(defense_module.DEFENSES, "graphed", graphed)
    monkeypatch.setattr(defense_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    sweep = bs.defense_sweep(
        net, x, x, targets_of(net, x), "gradient", [1.0, 2.0], defenses=["graphed"]
    )
    assert [r["seconds"] for r in sweep.records()] == [1.5] * 8
    for adv, clean in sweep.maps.values():
        assert not adv.requires_grad and not clean.requires_grad
        assert adv.grad_fn is None and clean.grad_fn is None


def test_a_sweep_refuses_no_betas_an_x_adv_of_another_shape_and_merges_a_defense_named_twice(
    small,
):
    from betasmooth.defense import check_defenses

    net, x = small
    target = targets_of(net, x)
    with pytest.raises(bs.InputError, match=r"^betas must hold at least one positive number"):
        bs.defense_sweep(net, x, x, target, "gradient", [], smoothgrad_n=2)
    with pytest.raises(
        bs.InputError,
        match=r"^x_adv must have the shape of x, \(4, 1, 16, 16\); got \(3, 1, 16, 16\)$",
    ):
        bs.defense_sweep(net, x, x[:3], target, "gradient", [1.0], smoothgrad_n=2)
    # The same batch size is not enough: images of another size are refused as well.
    with pytest.raises(
        bs.InputError,
        match=r"^x_adv must have the shape of x, \(4, 1, 16, 16\); got \(4, 1, 8, 16\)$",
    ):
        bs.defense_sweep(net, x, x[:, :, :8], target, "gradient", [1.0], smoothgrad_n=2)
    # Named twice, a defense runs once: each image counts once in its beta's medians.
    assert check_defenses(["smoothgrad", "beta_smooth", "smoothgrad"]) == [
        "smoothgrad", "beta_smooth"
    ]  # fmt: skip
    sweep = bs.defense_sweep(
        net, x, x, target, "gradient", [1.0], defenses=["beta_smooth", "beta_smooth"]
    )
    assert sorted((r["defense"], r["index"]) for r in sweep.records()) == [
        ("beta_smooth", i) for i in range(4)
    ]


def test_medians_are_each_numbers_median_over_the_images_with_the_noise_level(small):
    # One dict per (defense, beta): n images, the median of every number of the rows
    # (np.median as the oracle), and SmoothGrad's sigma, pi / (sqrt(3) beta) by default.
    net, x = small
    x_adv = (x + 0.03 * torch.rand(x.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    sweep = bs.defense_sweep(
        net, x, x_adv, targets_of(net, x), "gradient", [1.0, 4.0], smoothgrad_n=2, seed=5
    )
    rows = sweep.records()
    medians = sweep.medians()
    assert sorted((m["defense"], m["beta"]) for m in medians) == [
        ("beta_smooth", 1.0), ("beta_smooth", 4.0), ("smoothgrad", 1.0), ("smoothgrad", 4.0)
    ]  # fmt: skip
    numbers = [k for k, v in rows[0].items() if isinstance(v, float)]
    assert {"clean_vs_orig_pcc", "clean_vs_target_ssim", "undefended_mse"} <= set(numbers)
    for med in medians:
        group = [r for r in rows if (r["defense"], r["beta"]) == (med["defense"], med["beta"])]
        assert med["n"] == len(group) == 4
        # The measured numbers only: not the row's index nor its flags (changed, attacked).
        assert set(med) == {"defense", "beta", "n", "sigma", *numbers}
        sigma = math.pi / (math.sqrt(3) * med["beta"])
        assert med["sigma"] == (pytest.approx(sigma) if med["defense"] == "smoothgrad" else None)
        for key in numbers:
            if key in ("beta", "sigma"):
                continue
            assert med[key] == pytest.approx(np.median([r[key] for r in group])), key


def test_method_options_reach_both_defenses_and_smoothgrad_takes_20_draws_by_default(small):
    # Integrated gradients with 4 points, not the attack's 30 nor explain's 50: beta-smoothing
    # of it is integrated gradients of the softplus network (the ReLU modules swapped for
    # nn.Softplus), and SmoothGrad averages it over 20 logistic draws unless told otherwise.
    net, x = small
    x_adv = (x + 0.03 * torch.rand(x.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    seeds = [3, 4, 5, 6]
    sweep = bs.defense_sweep(
        net, x, x_adv, targets_of(net, x), "integrated_gradients", [2.0],
        method_options={"steps": 4}, seed=seeds,
    )  # fmt: skip
    label = predict(net, x).repeat(2)
    both = torch.cat([x_adv, x])
    twin = relu_replaced(net, lambda: nn.Softplus(beta=2.0, threshold=40.0))
    want = maps_of(twin, both, "integrated_gradients", target=label, steps=4)
    torch.testing.assert_close(torch.cat(sweep.maps[("beta_smooth", 2.0)]), want)
    noisy = maps_of(
        net, both, "smoothgrad", target=label, base="integrated_gradients",
        base_options={"steps": 4}, n=20, sigma=matched_sigma(2.0), noise="logistic",
        input_range=1.0, seed=seeds + seeds,
    )  # fmt: skip
    torch.testing.assert_close(torch.cat(sweep.maps[("smoothgrad", 2.0)]), noisy)
    # The undefended map the defenses are compared with is the 4-point one too.
    plain = maps_of(net, both, "integrated_gradients", target=label, steps=4)
    undefended = bs.compare(*plain.chunk(2))
    for row in sweep.records():
        i = row["index"]
        assert row["undefended_pcc"] == pytest.approx(float(undefended["pcc"][i]), abs=1e-6)


def test_a_per_image_baseline_goes_with_its_image_and_its_attacked_copy(small):
    # The defenses explain [x_adv, x] in one batch of 2B: image i and its attacked copy
    # both start integrated gradients from baseline i, as IG of the softplus network
    # (the ReLU modules swapped for nn.Softplus) with the baselines stacked twice.
    net, x = small
    x_adv = (x + 0.03 * torch.rand(x.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    baseline = 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    sweep = bs.defense_sweep(
        net, x, x_adv, targets_of(net, x), "integrated_gradients", [2.0],
        method_options={"steps": 4, "baseline": baseline}, defenses=["beta_smooth"],
    )  # fmt: skip
    label = predict(net, x).repeat(2)
    twin = relu_replaced(net, lambda: nn.Softplus(beta=2.0, threshold=40.0))
    want = maps_of(twin, torch.cat([x_adv, x]), "integrated_gradients", target=label, steps=4,
                   baseline=torch.cat([baseline, baseline]))  # fmt: skip
    torch.testing.assert_close(torch.cat(sweep.maps[("beta_smooth", 2.0)]), want)


def test_given_smoothgrad_sigmas_without_a_data_range_are_fractions_of_each_images_range(small):
    # data_range=None: each image's noise is sigma times its own max - min (Smilkov et al.),
    # here 1/4 to 4/4 of the batch's, not the batch's range for all.
    net, x = small
    x = x * torch.tensor([0.25, 0.5, 0.75, 1.0]).view(4, 1, 1, 1)
    x_adv = x.flip(-1)
    seeds = [1, 2, 3, 4]
    sweep = bs.defense_sweep(
        net, x, x_adv, targets_of(net, x), "gradient", [1.0], smoothgrad_sigmas=[0.2],
        smoothgrad_n=3, defenses=["smoothgrad"], data_range=None, seed=seeds,
    )  # fmt: skip
    both = torch.cat([x_adv, x])
    spans = both.amax((1, 2, 3), keepdim=True) - both.amin((1, 2, 3), keepdim=True)
    assert not torch.allclose(spans, spans.max().expand_as(spans))
    want = maps_of(
        net, both, "smoothgrad", target=predict(net, x).repeat(2), n=3, sigma=0.2,
        noise="logistic", input_range=spans, seed=seeds + seeds,
    )  # fmt: skip
    torch.testing.assert_close(torch.cat(sweep.maps[("smoothgrad", 1.0)]), want)


def test_a_sweep_shows_a_progress_bar_only_when_asked(small, capfd):
    net, x = small
    target = targets_of(net, x)
    for progress in (False, True):
        bs.defense_sweep(
            net, x, x, target, "gradient", [1.0], smoothgrad_n=1, defenses=["smoothgrad"],
            progress=progress,
        )  # fmt: skip
        err = capfd.readouterr().err
        assert ("defense sweep" in err) is progress, err


def test_sweep_scales_checks_each_beta_and_sigma_before_any_map_is_made():
    from betasmooth.defense import check_defenses, sweep_scales

    # A string is one value, not a sequence of its characters.
    with pytest.raises(bs.InputTypeError, match=r"^betas must be a sequence of positive numbers"):
        sweep_scales("12", None)
    with pytest.raises(bs.InputTypeError, match=r"^defenses must be a sequence of names"):
        check_defenses("smoothgrad")
    with pytest.raises(bs.InputError, match=r"^defenses must name at least one of: beta_smooth, "):
        check_defenses([])

    # matched: pi / (sqrt(3) beta) per beta, in the order given.
    betas, sigmas = sweep_scales([4, 0.5], None)
    assert betas == [4.0, 0.5]
    assert sigmas == pytest.approx([math.pi / (math.sqrt(3) * b) for b in (4, 0.5)], rel=1e-15)
    with pytest.raises(bs.InputError, match=r"^beta must be between 1.175e-38 and 3.403e\+38"):
        sweep_scales([1.0, 1e39], None)
    with pytest.raises(bs.InputError, match=r"^smoothgrad_sigmas must be a positive"):
        sweep_scales([1.0, 2.0], [0.1, -0.1])
    with pytest.raises(bs.InputError, match=r"^smoothgrad_sigmas must hold one value per beta"):
        sweep_scales([1.0, 2.0], [0.1])


@pytest.mark.parametrize("method", ["smoothgrad", "beta_smooth"])
def test_a_sweep_refuses_a_method_that_is_itself_a_defense(small, method):
    # Each defense wraps the base method: beta-smoothing of SmoothGrad is no sweep of either.
    net, x = small
    with pytest.raises(bs.InputError, match=rf"^{method} is itself a smoothing of a base method"):
        bs.defense_sweep(net, x, x, bs.heatmap(x), method, [1.0], smoothgrad_n=2)


def test_a_sweep_checks_both_batches_against_the_data_range_0_to_1_by_default(small):
    net, x = small
    target = targets_of(net, x)
    outside = r"has values in \[.*\], outside data_range \[0, 1\]"
    with pytest.raises(bs.InputError, match=rf"^x {outside}"):
        bs.defense_sweep(net, 2 * x, 2 * x, target, "gradient", [1.0], smoothgrad_n=2)
    with pytest.raises(bs.InputError, match=rf"^x_adv {outside}"):
        bs.defense_sweep(net, x, 2 * x, target, "gradient", [1.0], smoothgrad_n=2)
    # data_range=None takes each batch as it is.
    sweep = bs.defense_sweep(
        net, x, 2 * x, target, "gradient", [1.0], smoothgrad_n=2, data_range=None
    )
    assert len(sweep.records()) == 2 * len(x)


def test_a_sweep_names_an_x_adv_that_is_no_batch_of_tensors(small):
    net, x = small
    target = targets_of(net, x)
    with pytest.raises(bs.InputError, match=r"^x_adv must have at least 4 dimensions"):
        bs.defense_sweep(net, x, x[0], target, "gradient", [1.0], smoothgrad_n=2)
    with pytest.raises(bs.InputTypeError, match=r"^x_adv must be a torch.Tensor batched"):
        bs.defense_sweep(net, x, x.numpy(), target, "gradient", [1.0], smoothgrad_n=2)
    # Checked against the model under its own name too: a dtype the model cannot take.
    with pytest.raises(bs.InputTypeError, match=r"^x_adv has dtype torch.float16 but the model"):
        bs.defense_sweep(net, x, x.half(), target, "gradient", [1.0], smoothgrad_n=2)


def test_a_sweep_without_a_seed_draws_smoothgrads_noise_from_seed_0(small):
    # The default seed is 0, as the command line's --seed: a sweep called without one
    # has the maps of seed=0, which another seed's draws do not give.
    net, x = small
    target = targets_of(net, x)

    def maps(**seed):
        sweep = bs.defense_sweep(
            net, x, x, target, "gradient", [2.0], smoothgrad_n=2, defenses=["smoothgrad"], **seed
        )
        return torch.cat(sweep.maps[("smoothgrad", 2.0)])

    default = maps()
    torch.testing.assert_close(default, maps(seed=0), rtol=0, atol=0)
    assert not torch.allclose(default, maps(seed=1))


def test_a_defense_named_as_a_key_of_the_summary_is_refused(monkeypatch):
    # The summary holds each defense's table under its name beside "betas",
    # "undefended" and the rest: a defense called "betas" would overwrite beta-smoothing's.
    from betasmooth.defense import DEFENSES, check_defenses
    from betasmooth.validate import InputError

    monkeypatch.setitem(DEFENSES, "betas", DEFENSES["smoothgrad"])
    with pytest.raises(InputError, match=r"^defense 'betas' has the name of a key of the sweep's"):
        check_defenses(["beta_smooth", "betas"])
