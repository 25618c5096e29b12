"""Medians of a sweep, the recommended beta and the verdict, by hand."""

from __future__ import annotations

import pytest

import betasmooth as bs
from betasmooth import recommend as bs_recommend
from betasmooth.recommend import (
    defense_tables,
    format_summary,
    recommend_beta,
    sweep_summary,
    verdict,
)
from betasmooth.validate import InputError


def test_no_share_of_a_gain_within_the_noise_of_pcc_is_given():
    # A gain of 0.005 in PCC to the target made "84 % of the attack's gain left" of noise.
    def row(beta, adv, clean):
        return {
            "defense": "beta_smooth", "beta": beta, "adv_vs_clean_pcc": 0.9,
            "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.8, "adv_vs_target_pcc": adv,
            "clean_vs_target_pcc": clean, "undefended_target_pcc": 0.305,
            "undefended_before_pcc": 0.3,
        }  # fmt: skip

    summary = bs_recommend.sweep_summary([row(1.0, 0.31, 0.3)])["method"]
    assert summary["undefended"]["gain_pcc"] is None
    assert summary["betas"]["1"]["gain_left"] is None
    assert "% of the attack's gain" not in verdict(summary)
    # Above it: (0.36 - 0.3) / (0.4 - 0.3) of the gain left.
    moved = {**row(1.0, 0.36, 0.3), "undefended_target_pcc": 0.4}
    summary = bs_recommend.sweep_summary([moved])["method"]
    assert summary["betas"]["1"]["gain_left"] == pytest.approx(0.6)
    assert verdict(summary).endswith("; 60 % of the attack's gain in PCC to the target left")
    # (0.4 - 0.3) / (0.4 - 0.3): all of the gain left, but not more than undefended.
    same = bs_recommend.sweep_summary([{**moved, "adv_vs_target_pcc": 0.4}])["method"]
    assert same["betas"]["1"]["gain_left"] == 1.0
    assert verdict(same).endswith("; 100 % of the attack's gain in PCC to the target left")
    # (0.42 - 0.3) / (0.4 - 0.3): more than the gain without a defense, said so.
    beyond = bs_recommend.sweep_summary([{**moved, "adv_vs_target_pcc": 0.42}])["method"]
    assert beyond["betas"]["1"]["gain_left"] == pytest.approx(1.2)
    assert verdict(beyond).endswith(
        "; 120 % of the attack's gain in PCC to the target left (more than undefended: "
        "under it the attacked map moves further to the target)"
    )
    # 100.4 % reads as 100 %, which is no more than undefended.
    level = bs_recommend.sweep_summary([{**moved, "adv_vs_target_pcc": 0.4004}])["method"]
    assert verdict(level).endswith("; 100 % of the attack's gain in PCC to the target left")
    # Records of an older version among the rows: no gain from part of the images.
    old = {k: v for k, v in moved.items() if not k.startswith("undefended_t")}
    old.pop("undefended_before_pcc")
    mixed = bs_recommend.sweep_summary([moved, {**old}])["method"]
    assert mixed["undefended"]["gain_pcc"] is None


def _gain_rows(after, before=0.3, **extra):
    # One image, beta_smooth at beta 1: its PCC to the target moved from 0.3 to after.
    return [
        {
            "defense": "beta_smooth",
            "beta": 1.0,
            "adv_vs_clean_pcc": 0.9,
            "clean_vs_orig_pcc": 0.95,
            "undefended_pcc": 0.8,
            "adv_vs_target_pcc": 0.25,
            "clean_vs_target_pcc": 0.3,
            "undefended_target_pcc": after,
            "undefended_before_pcc": before,
            **extra,
        }
    ]


def test_a_share_of_a_gain_below_min_gain_is_not_given():
    # A gain of 0.013 made gain left read -6.3 at one beta and 3.2 at another: noise
    # over 0.013. From MIN_GAIN = 0.05 on, 0.01 of noise moves the share by at most 0.2.
    assert bs_recommend.MIN_GAIN == pytest.approx(0.05)
    small = sweep_summary(_gain_rows(0.313))["method"]
    assert small["undefended"]["gain_pcc"] == pytest.approx(0.013)  # the gain is said
    assert small["betas"]["1"]["gain_left"] is None  # its share is not
    assert "% of the attack's gain" not in verdict(small)
    assert format_summary({"method": small}).splitlines()[2].split()[-1] == "-"
    # (0.25 - 0.3) / (0.36 - 0.3) at a gain of 0.06.
    enough = sweep_summary(_gain_rows(0.36))["method"]
    assert enough["betas"]["1"]["gain_left"] == pytest.approx(-5 / 6)
    # A gain of exactly MIN_GAIN (0.1 - 0.05, exact in binary) is not below it: its
    # share (0.25 - 0.3) / 0.05 is given.
    edge = sweep_summary(_gain_rows(0.1, before=0.05))["method"]
    assert edge["undefended"]["gain_pcc"] == bs_recommend.MIN_GAIN
    assert edge["betas"]["1"]["gain_left"] == pytest.approx(-1.0)


def _image(index, attacked, robust, plain, fidelity, after, before=0.3):
    # One image's beta_smooth row at beta 1, its PCC to the target moved before -> after.
    return {
        "defense": "beta_smooth", "beta": 1.0, "index": index, "attacked": attacked,
        "adv_vs_clean_pcc": robust, "clean_vs_orig_pcc": fidelity, "undefended_pcc": plain,
        "adv_vs_target_pcc": before + 0.25 * (after - before), "clean_vs_target_pcc": before,
        "undefended_target_pcc": after, "undefended_before_pcc": before,
    }  # fmt: skip


def test_robustness_and_gain_are_medians_over_the_images_the_attack_changed():
    # Of 4 images the attack moved one: with the 3 it left alone (robustness 1 defended
    # or not, no gain) in the medians, the verdict read "1.000 vs 1.000, about as robust"
    # and the gain 0. Over the moved one: robustness 0.7 against 0.4 undefended, gain
    # 0.8 - 0.3 = 0.5 of which 0.25 left; fidelity stays the median of all 4.
    rows = [_image(0, True, 0.7, 0.4, 0.92, 0.8)] + [
        _image(i, False, 1.0, 1.0, f, 0.3) for i, f in ((1, 0.91), (2, 0.97), (3, 0.99))
    ]
    s = sweep_summary(rows)["method"]
    assert s["attacked"] == 1 and s["undefended"]["n"] == s["betas"]["1"]["n"] == 4
    assert s["undefended"]["robustness_pcc"] == pytest.approx(0.4)
    assert s["betas"]["1"]["robustness_pcc"] == pytest.approx(0.7)
    assert s["betas"]["1"]["fidelity_pcc"] == pytest.approx((0.92 + 0.97) / 2)
    assert s["undefended"]["gain_pcc"] == pytest.approx(0.5)
    assert s["betas"]["1"]["gain_left"] == pytest.approx(0.25)
    assert s["recommended_beta"] == 1.0
    assert verdict(s) == (
        "recommended beta 1 (most robust with median fidelity >= 0.9): robustness 0.700 vs "
        "0.400 undefended, more robust; 25 % of the attack's gain in PCC to the target left"
    )
    assert format_summary({"method": s}).splitlines()[-1] == (
        "method: robustness and gain left of the 1 of 4 images the attack changed"
    )
    # A defense less robust than none on the moved image is no longer hidden by the others.
    worse = [{**rows[0], "adv_vs_clean_pcc": 0.3}, *rows[1:]]
    assert sweep_summary(worse)["method"]["recommended_beta"] is None
    # Every image moved: the medians of all of them, and no line about it.
    every = [{**r, "attacked": True} for r in rows]
    s = sweep_summary(every)["method"]
    assert s["betas"]["1"]["robustness_pcc"] == pytest.approx(1.0)
    assert "images the attack changed" not in format_summary({"method": s})


def test_an_attack_that_moved_the_maps_away_from_the_target_has_no_gain_to_share():
    # PCC to the target 0.3 -> 0.1: no gain, so no share of one; a negative gain made
    # the defense's own drop from 0.3 to 0.25 read as "25 % of the gain left".
    summary = bs_recommend.sweep_summary(_gain_rows(0.1))["method"]
    assert summary["undefended"]["gain_pcc"] is None
    assert summary["betas"]["1"]["gain_left"] is None
    assert "% of the attack's gain" not in verdict(summary)
    # The same records with a gain: (0.25 - 0.3) / (0.5 - 0.3) of it left.
    summary = bs_recommend.sweep_summary(_gain_rows(0.5))["method"]
    assert summary["undefended"]["gain_pcc"] == pytest.approx(0.2)
    assert summary["betas"]["1"]["gain_left"] == pytest.approx(-0.25)


def test_an_adaptive_attack_has_no_gain_of_the_base_map_to_share():
    # The attack moved the defended beta_smooth map; the undefended scores are those
    # of its gradient base, whose gain is not the one a defense would undo.
    rows = _gain_rows(0.5, method="beta_smooth", base="gradient")
    summary = bs_recommend.sweep_summary(rows)["beta_smooth"]
    assert summary["base"] == "gradient"
    assert summary["undefended"]["gain_pcc"] is None
    assert summary["betas"]["1"]["gain_left"] is None
    assert format_summary({"beta_smooth": summary}).splitlines()[-1] == (
        "beta_smooth: attacked through its own map, swept on gradient: undefended is the "
        "plain gradient map of the attacked image"
    )
    # Swept on its own map, the same records give the share, and no such line.
    plain = bs_recommend.sweep_summary(_gain_rows(0.5, method="gradient", base="gradient"))
    assert plain["gradient"]["betas"]["1"]["gain_left"] == pytest.approx(-0.25)
    assert "attacked through its own map" not in format_summary(plain)


def test_a_beta_that_changes_no_map_is_named_when_none_is_recommended():
    # beta 1e9 is ReLU to float precision: fidelity 1 but no defense. The verdict said
    # "no beta in the sweep has median fidelity >= 0.9", false of that beta.
    cells = {
        "0.5": {"robustness_pcc": 0.9, "fidelity_pcc": 0.5, "changed": True},
        "1e+09": {"robustness_pcc": 0.4, "fidelity_pcc": 1.0, "changed": False},
    }
    summary = {"betas": cells, "recommended_beta": None, "min_fidelity": 0.9}
    assert verdict(summary) == (
        "no beta that changed a map has median fidelity >= 0.9 (beta 1e+09 changed none); "
        "none recommended"
    )
    cells["0.5"]["fidelity_pcc"] = 0.95
    assert recommend_beta(cells) == 0.5


def test_betas_that_six_digits_do_not_hold_keep_their_own_cells():
    # Keyed by f"{beta:g}", two betas shared one cell and the recommended beta was
    # 3.14159, which no sweep had run.
    from betasmooth.recommend import sweep_summary

    rows = [
        {"method": "gradient", "defense": "beta_smooth", "beta": beta, "changed": True}
        | {"adv_vs_clean_pcc": robust, "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.2}
        for beta, robust in [(0.1234561, 0.5), (0.1234562, 0.6), (3.14159265, 0.7)]
        for _ in range(2)
    ]
    summary = sweep_summary(rows)["gradient"]
    assert sorted(summary["betas"]) == ["0.1234561", "0.1234562", "3.14159265"]
    assert [c["n"] for c in summary["betas"].values()] == [2, 2, 2]
    assert summary["recommended_beta"] == 3.14159265
    assert verdict(summary).startswith("recommended beta 3.14159265 ")


def test_recommended_beta_by_hand():
    # Fidelity exactly at the threshold counts ("median fidelity >= min_fidelity").
    cells = {
        "1": {"robustness_pcc": 0.9, "fidelity_pcc": 0.9},
        "8": {"robustness_pcc": 0.5, "fidelity_pcc": 0.99},
    }
    assert recommend_beta(cells, min_fidelity=0.9) == 1.0
    # Equally robust betas: the larger one, which changes the network less.
    tied = {
        "1": {"robustness_pcc": 0.8, "fidelity_pcc": 0.95},
        "5": {"robustness_pcc": 0.8, "fidelity_pcc": 0.95},
        "2": {"robustness_pcc": 0.8, "fidelity_pcc": 0.95},
    }
    assert recommend_beta(tied) == 5.0


def test_sweep_summary_leaves_out_records_without_a_defense_or_a_numeric_beta():
    # Only a record with both is a sweep cell; the others (an attack's records,
    # a damaged one) leave the summary as it is without them.
    from betasmooth.recommend import sweep_summary

    row = {
        "defense": "beta_smooth",
        "beta": 2.0,
        "adv_vs_clean_pcc": 0.7,
        "clean_vs_orig_pcc": 0.95,
        "undefended_pcc": 0.2,
    }
    others = [
        {**row, "beta": None},
        {**row, "beta": "2"},
        {k: v for k, v in row.items() if k != "defense"},
    ]
    assert sweep_summary([row, *others]) == sweep_summary([row])
    assert sweep_summary([row])["method"]["betas"]["2"]["n"] == 1


def test_an_integer_beta_is_the_beta_of_its_float():
    # A record written by hand or by another tool may hold "beta": 2; it is a numeric
    # beta like 2.0, in the same cell.
    from betasmooth.recommend import sweep_summary

    row = {"defense": "beta_smooth", "adv_vs_clean_pcc": 0.7, "clean_vs_orig_pcc": 0.95}
    row |= {"undefended_pcc": 0.2}
    rows = [{**row, "beta": 2, "index": 0}, {**row, "beta": 2.0, "index": 1}]
    summary = sweep_summary(rows)["method"]
    assert list(summary["betas"]) == ["2"] and summary["betas"]["2"]["n"] == 2
    assert summary["recommended_beta"] == 2.0


def test_cells_of_older_records_without_changed_are_taken_as_changed():
    # Records of versions before "changed" do not say; they count as defenses, so no
    # beta is named as one that changed nothing.
    cells = {
        "1": {"robustness_pcc": 0.9, "fidelity_pcc": 0.5},
        "5": {"robustness_pcc": 0.7, "fidelity_pcc": 0.6},
    }
    summary = {"betas": cells, "recommended_beta": None, "min_fidelity": 0.9}
    assert verdict(summary) == "no beta in the sweep has median fidelity >= 0.9; none recommended"


def test_a_recommended_beta_is_recommended_beside_a_beta_that_changed_nothing():
    cells = {
        "2": {"robustness_pcc": 0.8, "fidelity_pcc": 0.95, "changed": True},
        "1e+09": {"robustness_pcc": 0.4, "fidelity_pcc": 1.0, "changed": False},
    }
    summary = {"betas": cells, "undefended": {"robustness_pcc": 0.3}, "min_fidelity": 0.9}
    summary["recommended_beta"] = recommend_beta(cells)
    assert summary["recommended_beta"] == 2.0
    assert verdict(summary) == (
        "recommended beta 2 (most robust with median fidelity >= 0.9): "
        "robustness 0.800 vs 0.300 undefended, more robust"
    )


def test_the_summary_table_keeps_a_long_method_name_apart_from_its_defense():
    from betasmooth.recommend import format_summary, sweep_summary

    rows = [
        {"method": m, "defense": "beta_smooth", "beta": 2.0, "adv_vs_clean_pcc": 0.5}
        | {"clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.2}
        for m in ("lrp", "integrated_gradients")
    ]
    table = format_summary(sweep_summary(rows)).splitlines()
    cells = [line.split()[:3] for line in table[1:5]]
    assert cells == [
        [m, d, b]
        for m in ("lrp", "integrated_gradients")
        for d, b in [("undefended", "-"), ("beta_smooth", "2")]
    ]
    # Each column starts where its heading does.
    for line in table[1:5]:
        assert line.index(line.split()[1]) == table[0].index("defense")


def test_the_summary_table_counts_the_records_of_each_row():
    from betasmooth.recommend import format_summary, sweep_summary

    counts = {("beta_smooth", 1.0): 1, ("beta_smooth", 2.0): 3, ("smoothgrad", 1.0): 2}
    rows = [
        {"defense": d, "beta": b, "index": i, "adv_vs_clean_pcc": 0.5}
        | {"clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.2}
        for (d, b), n in counts.items()
        for i in range(n)
    ]
    table = format_summary(sweep_summary(rows)).splitlines()[1:]
    shown = {tuple(line.replace(" *", "").split()[1:4]) for line in table[:4]}
    assert shown == {
        ("undefended", "-", "1"),
        ("beta_smooth", "1", "1"),
        ("beta_smooth", "2", "3"),
        ("smoothgrad", "1", "2"),
    }


def test_sweep_summary_counts_the_images_of_the_undefended_column():
    # Three images, each in four cells (two defenses, two betas): n is 3, not 4 or 12.
    from betasmooth.recommend import sweep_summary

    rows = [
        {
            "defense": d,
            "beta": b,
            "index": i,
            "adv_vs_clean_pcc": 0.5,
            "clean_vs_orig_pcc": 0.9,
            "undefended_pcc": 0.1 * i,
        }
        for d in ("beta_smooth", "smoothgrad")
        for b in (1.0, 5.0)
        for i in range(3)
    ]
    summary = sweep_summary(rows)["method"]
    assert summary["undefended"]["n"] == 3
    assert summary["undefended"]["robustness_pcc"] == pytest.approx(0.1)
    assert summary["betas"]["5"]["n"] == summary["smoothgrad"]["1"]["n"] == 3


def test_sweep_summary_lists_the_betas_in_increasing_order():
    from betasmooth.recommend import format_summary, sweep_summary

    rows = [
        {"defense": d, "beta": b, "adv_vs_clean_pcc": 0.5, "clean_vs_orig_pcc": 0.95}
        | {"undefended_pcc": 0.2}
        for d in ("smoothgrad", "beta_smooth")
        for b in (10.0, 2.0, 0.5)
    ]
    s = sweep_summary(rows)["method"]
    assert list(s["betas"]) == list(s["smoothgrad"]) == ["0.5", "2", "10"]
    table = format_summary({"method": s}).splitlines()[2:8]  # below the undefended row
    cells = [line.split()[1:3] for line in table]
    assert cells == [[d, b] for d in ("beta_smooth", "smoothgrad") for b in ("0.5", "2", "10")]


def test_a_beta_that_changed_some_maps_is_a_defense():
    from betasmooth.recommend import sweep_summary

    rows = [
        {"method": "gradient", "defense": "beta_smooth", "beta": 2.0, "changed": changed}
        | {"adv_vs_clean_pcc": 0.8, "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.2}
        for changed in (True, False)
    ]
    summary = sweep_summary(rows)["gradient"]
    assert summary["betas"]["2"]["changed"] is True
    assert summary["recommended_beta"] == 2.0


@pytest.mark.parametrize(
    ("ours", "word"),
    [(0.505, "about as robust (within 0.01)"), (0.52, "more robust"), (0.48, "less robust")],
)
def test_verdict_words_by_hand(ours, word):
    summary = {
        "betas": {"4": {"robustness_pcc": ours, "fidelity_pcc": 0.95, "changed": True}},
        "undefended": {"robustness_pcc": 0.5},
        "recommended_beta": 4.0,
        "min_fidelity": 0.9,
    }
    assert verdict(summary) == (
        f"recommended beta 4 (most robust with median fidelity >= 0.9): "
        f"robustness {ours:.3f} vs 0.500 undefended, {word}"
    )


@pytest.mark.parametrize(("ours", "plain"), [(0.02, 0.01), (0.01, 0.02)])
def test_robustness_exactly_same_pcc_apart_is_about_as_robust(ours, plain):
    # 0.02 - 0.01 is exactly SAME_PCC in binary: within it, neither more nor less robust,
    # and a beta that much below no defense is not "below by more than SAME_PCC".
    cells = {"4": {"robustness_pcc": ours, "fidelity_pcc": 0.95, "changed": True}}
    assert recommend_beta(cells, undefended=plain) == 4.0
    summary = {"betas": cells, "undefended": {"robustness_pcc": plain}}
    summary |= {"recommended_beta": 4.0, "min_fidelity": 0.9}
    assert verdict(summary).endswith(
        f"robustness {ours:.3f} vs {plain:.3f} undefended, about as robust (within 0.01)"
    )


@pytest.mark.parametrize("bound", [0.0, 1.0])
def test_min_fidelity_takes_its_bounds_0_and_1(bound):
    # The range [0, 1] is closed: at 1 a beta of median fidelity exactly 1 qualifies.
    rows = [
        {"defense": "beta_smooth", "beta": 2.0, "adv_vs_clean_pcc": 0.5}
        | {"clean_vs_orig_pcc": bound, "undefended_pcc": 0.2}
    ]
    summary = sweep_summary(rows, min_fidelity=bound)["method"]
    assert (summary["min_fidelity"], summary["recommended_beta"]) == (bound, 2.0)


def test_the_undefended_row_is_over_the_images_of_beta_smoothings_cells():
    # Records of two runs: beta-smoothing at beta 2 over images 0 to 2, smoothgrad at a
    # smaller beta over image 0 alone. The recommendation weighs beta-smoothing's
    # robustness against the undefended one, so that row is over its 3 images: the
    # median of 0.1, 0.2 and 0.6 (of image 0 alone it would be 0.1, n 1).
    rows = [
        {"defense": "beta_smooth", "beta": 2.0, "index": i, "adv_vs_clean_pcc": 0.5}
        | {"clean_vs_orig_pcc": 0.95, "undefended_pcc": plain}
        for i, plain in enumerate((0.1, 0.2, 0.6))
    ]
    rows.append(
        {"defense": "smoothgrad", "beta": 0.5, "index": 0, "adv_vs_clean_pcc": 0.4}
        | {"clean_vs_orig_pcc": 0.9, "undefended_pcc": 0.1}
    )
    summary = sweep_summary(rows)["method"]
    assert summary["undefended"]["n"] == 3
    assert summary["undefended"]["robustness_pcc"] == pytest.approx(0.2)


def test_another_defense_has_its_own_table_and_aligned_rows():
    # Two images, a defense beside the paper's: its cells are the medians of its rows.
    rows = [
        {"defense": d, "beta": 2.0, "adv_vs_clean_pcc": r, "clean_vs_orig_pcc": f}
        | {"undefended_pcc": 0.2}
        for d, r, f in [
            ("beta_smooth", 0.5, 0.9), ("beta_smooth", 0.7, 0.95),
            ("a_longer_defense_name", 0.1, 0.4), ("a_longer_defense_name", 0.4, 0.6),
        ]
    ]  # fmt: skip
    summary = sweep_summary(rows)["method"]
    # SmoothGrad was not swept: its table is empty, and it is not among the defenses.
    assert summary["defenses"] == ["beta_smooth", "a_longer_defense_name"]
    assert summary["smoothgrad"] == {}
    cell = summary["a_longer_defense_name"]["2"]
    assert (cell["n"], cell["robustness_pcc"], cell["fidelity_pcc"]) == (
        2, pytest.approx(0.25), pytest.approx(0.5),
    )  # fmt: skip
    assert defense_tables(summary) == {
        "beta_smooth": summary["betas"], "a_longer_defense_name": {"2": cell},
    }  # fmt: skip
    lines = format_summary({"method": summary}).splitlines()
    table = [line for line in lines if not line.startswith("method:")]
    assert len({len(line) for line in table}) == 1  # the long name keeps the columns aligned
    row = next(line for line in table if "a_longer_defense_name" in line).split()
    assert row[4:7] == ["0.250", "-", "0.500"]
    # A summary written before it listed its defenses has the paper's two.
    older = {k: v for k, v in summary.items() if k not in ("defenses", "a_longer_defense_name")}
    assert list(defense_tables(older)) == ["beta_smooth", "smoothgrad"]


@pytest.mark.parametrize(
    "name",
    [
        "betas", "undefended", "recommended_beta", "defenses", "attacked", "min_fidelity",
        "robustness_over", "base",
    ],
)  # fmt: skip
def test_a_defense_named_as_a_key_of_the_summary_is_refused(name, small):
    from betasmooth.defense import DEFENSES

    rows = [{"defense": name, "beta": 1.0, "adv_vs_clean_pcc": 0.5}]
    with pytest.raises(InputError, match=f"^defense '{name}' has the name of a key"):
        sweep_summary(rows)
    net, x = small
    DEFENSES[name] = DEFENSES["beta_smooth"]
    try:
        with pytest.raises(InputError, match=f"^defense '{name}' has the name of a key"):
            bs.defense_sweep(net, x, x, bs.heatmap(x), "gradient", [1.0], defenses=[name])
    finally:
        DEFENSES.pop(name)


@pytest.mark.parametrize(
    ("plain", "recommended"), [(0.704, None), (0.515, None), (0.505, 20.0), (0.3, 20.0)]
)
def test_a_beta_less_robust_than_no_defense_is_not_recommended(plain, recommended):
    # Beta 20 is the only faithful beta; it is recommended unless its median robustness
    # (0.5) falls below the undefended one by more than SAME_PCC (0.01).
    rows = [
        {"defense": "beta_smooth", "beta": b, "adv_vs_clean_pcc": r, "clean_vs_orig_pcc": f}
        | {"undefended_pcc": plain}
        for b, r, f in [(1.0, 0.9, 0.2), (1.0, 0.8, 0.3), (20.0, 0.45, 0.9), (20.0, 0.55, 0.95)]
    ]
    summary = sweep_summary(rows)["method"]
    assert summary["betas"]["20"]["robustness_pcc"] == pytest.approx(0.5)
    assert summary["recommended_beta"] == recommended
    if recommended is None:
        assert verdict(summary) == (
            "the most robust beta with median fidelity >= 0.9, 20, leaves the map less robust "
            f"than no defense (0.500 vs {plain:.3f} undefended); none recommended"
        )
    else:
        assert verdict(summary).startswith("recommended beta 20 ")


def test_the_verdict_names_why_none_is_recommended():
    # Beta 1 is faithful and changed the maps, but is less robust than no defense; beta
    # 50 changed nothing. The reason is the first, not "no beta that changed a map".
    summary = {
        "betas": {
            "1": {"robustness_pcc": 0.2, "fidelity_pcc": 0.95},
            "50": {"robustness_pcc": 0.3, "fidelity_pcc": 1.0, "changed": False},
        },
        "undefended": {"robustness_pcc": 0.5},
        "recommended_beta": None,
        "min_fidelity": 0.9,
        "attacked": 2,
    }
    assert verdict(summary) == (
        "the most robust beta with median fidelity >= 0.9, 1, leaves the map less robust "
        "than no defense (0.200 vs 0.500 undefended); none recommended"
    )
    # A sweep of other defenses only: beta-smoothing was not swept.
    rows = [{"defense": "smoothgrad", "beta": 1.0, "adv_vs_clean_pcc": 0.5}]
    alone = sweep_summary(rows)["method"]
    assert alone["recommended_beta"] is None
    assert verdict(alone) == "beta-smoothing was not swept (--defenses); none recommended"


def test_the_verdict_on_a_beta_less_robust_than_no_defense_takes_the_sweeps_min_fidelity():
    # At --min-fidelity 0.5 beta 20 (fidelity 0.6) is the most robust faithful beta, and
    # less robust than no defense (0.5 vs 0.7); at the default 0.9 no beta would be faithful.
    rows = [
        {"defense": "beta_smooth", "beta": b, "adv_vs_clean_pcc": r, "clean_vs_orig_pcc": f}
        | {"undefended_pcc": 0.7}
        for b, r, f in [(1.0, 0.9, 0.2), (20.0, 0.5, 0.6)]
    ]
    summary = sweep_summary(rows, min_fidelity=0.5)["method"]
    assert summary["recommended_beta"] is None
    assert verdict(summary) == (
        "the most robust beta with median fidelity >= 0.5, 20, leaves the map less robust "
        "than no defense (0.500 vs 0.700 undefended); none recommended"
    )


def test_no_beta_is_recommended_when_the_attack_changed_no_image():
    # Two images whose x_adv is x: beta 2 is faithful and robust, but undoes nothing.
    rows = [
        {"defense": "beta_smooth", "beta": 2.0, "index": i, "attacked": False}
        | {"adv_vs_clean_pcc": 1.0, "clean_vs_orig_pcc": 0.95, "undefended_pcc": 1.0}
        for i in range(2)
    ]
    summary = sweep_summary(rows)["method"]
    assert summary["attacked"] == 0
    assert summary["recommended_beta"] is None
    assert verdict(summary) == (
        "the attack changed no image, so no defense has anything to undo; none recommended"
    )
    # With no image to leave out, robustness is the median over all of them, not of none.
    assert summary["betas"]["2"]["robustness_pcc"] == 1.0
    assert summary["undefended"]["robustness_pcc"] == 1.0
    # One image attacked of the two: the same cells recommend beta 2.
    rows[1]["attacked"] = True
    summary = sweep_summary(rows)["method"]
    assert (summary["attacked"], summary["recommended_beta"]) == (1, 2.0)


def test_a_summary_written_before_it_counted_the_attacked_images_is_formatted():
    # Summaries before 0.13.0 lack "attacked": not taken as partly attacked.
    rows = [
        {"defense": "beta_smooth", "beta": 1.0, "index": i}
        | {"adv_vs_clean_pcc": 0.8, "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3}
        for i in range(2)
    ]
    summary = sweep_summary(rows)["method"]
    del summary["attacked"], summary["robustness_over"]
    assert bs_recommend.partly_attacked(summary) is None
    assert format_summary({"method": summary}).splitlines()[-1] == (
        "method: recommended beta 1 (most robust with median fidelity >= 0.9): "
        "robustness 0.800 vs 0.300 undefended, more robust"
    )


def test_a_beta_without_a_robustness_median_is_passed_over_not_recommended():
    # Every adv_vs_clean_pcc of beta 1 is NaN (skipped by the medians): its
    # robustness is None, and only beta 5, with a number, can be recommended.
    cells = {
        "1": {"robustness_pcc": None, "fidelity_pcc": 0.99},
        "5": {"robustness_pcc": 0.5, "fidelity_pcc": 0.95},
    }
    assert recommend_beta(cells) == 5.0
    rows = [
        {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": float("nan"),
         "clean_vs_orig_pcc": 0.99, "undefended_pcc": 0.3},
        {"defense": "beta_smooth", "beta": 5.0, "adv_vs_clean_pcc": 0.5,
         "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3},
    ]  # fmt: skip
    summary = sweep_summary(rows)["method"]
    assert summary["betas"]["1"]["robustness_pcc"] is None
    assert summary["recommended_beta"] == 5.0


def test_a_gain_of_exactly_same_pcc_is_noise_and_has_no_value():
    # 0.01 - 0.0 is exactly SAME_PCC in binary too: "at most SAME_PCC" is None.
    row = {
        "defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.9,
        "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.8, "adv_vs_target_pcc": 0.01,
        "clean_vs_target_pcc": 0.0, "undefended_target_pcc": 0.01,
        "undefended_before_pcc": 0.0,
    }  # fmt: skip
    assert 0.01 - 0.0 == bs_recommend.SAME_PCC
    assert sweep_summary([row])["method"]["undefended"]["gain_pcc"] is None
    # Just above it the gain is given: 0.0125 - 0.0 by hand.
    above = {**row, "undefended_target_pcc": 0.0125}
    assert sweep_summary([above])["method"]["undefended"]["gain_pcc"] == 0.0125


def test_an_attack_that_changed_no_image_is_not_partly_attacked():
    # "Some of its n images but not all": none of 2 is not some, and the
    # robustness is then over all of them, so no line says "the 0 of 2 images".
    rows = [
        {"defense": "beta_smooth", "beta": 2.0, "index": i, "attacked": False}
        | {"adv_vs_clean_pcc": 1.0, "clean_vs_orig_pcc": 0.95, "undefended_pcc": 1.0}
        for i in range(2)
    ]
    summary = sweep_summary(rows)
    assert bs_recommend.partly_attacked(summary["method"]) is None
    assert "of the 0 of 2 images" not in format_summary(summary)
    # One of the two: partly attacked, and the table says over which images.
    rows[1]["attacked"] = True
    summary = sweep_summary(rows)
    assert bs_recommend.partly_attacked(summary["method"]) == (1, 2)
    assert format_summary(summary).endswith(
        "method: robustness and gain left of the 1 of 2 images the attack changed"
    )


def test_the_summary_table_prints_a_median_of_zero_as_a_number():
    # "-" marks a missing median; a robustness of exactly 0 (uncorrelated maps) is one.
    rows = [
        {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.0,
         "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.0}
    ]  # fmt: skip
    lines = format_summary(sweep_summary(rows)).splitlines()
    # Columns after method, defense, beta (with the mark of the recommended one), n.
    assert lines[1].split()[-5:] == ["0.000", "-", "1.000", "1.000", "-"]
    assert lines[2].split()[1:] == ["beta_smooth", "1", "*", "1", "0.000", "-", "0.950", "-", "-"]
