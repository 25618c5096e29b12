"""The built-in photographs and photos-cnn: offline, disjoint regions, accuracy, determinism."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from scipy.stats import pearsonr
from skimage.transform import resize
from sklearn.datasets import load_sample_image

import betasmooth as bs
from betasmooth import photos
from betasmooth.cli import main
from betasmooth.store import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_photos_cnn  # noqa: E402
from train_photos_cnn import fold_batch_norm, train, with_batch_norm  # noqa: E402

# The photographs as their packages give them, in class order.
SOURCES = {
    "astronaut": skimage.data.astronaut,
    "chelsea": skimage.data.chelsea,
    "china": lambda: load_sample_image("china.jpg"),
    "coffee": skimage.data.coffee,
    "flower": lambda: load_sample_image("flower.jpg"),
    "hubble_deep_field": skimage.data.hubble_deep_field,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "retina": skimage.data.retina,
    "rocket": skimage.data.rocket,
}


@pytest.fixture(scope="module")
def test_split(monkeypatch_module):
    """The test split, built from scratch with every network connection refused."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch_module.setattr(socket.socket, "connect", refuse)
    photos._photographs.cache_clear()
    photos._crops.cache_clear()
    return bs.load_data("photos", split="test")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_photos_load_offline_with_fixed_shapes_range_and_labels(test_split):
    x, y = test_split
    assert x.shape == (500, 3, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Ten photographs, 50 crops each, in turns.
    np.testing.assert_array_equal(y.numpy(), np.tile(np.arange(10), 50))
    assert list(photos.PHOTOS) == list(SOURCES)
    x_again, _ = bs.load_data("photos", split="test")
    torch.testing.assert_close(x_again, x, rtol=0, atol=0)


def test_crops_show_their_box_of_the_photograph(test_split):
    x, y = test_split
    _, _, boxes = photos.photo_crops("test")
    # Independent oracle: skimage's own antialiased resize of the box cut from the package's image.
    for i in range(0, 500, 37):
        top, left, height, width, flip = boxes[i]
        photo = SOURCES[list(SOURCES)[int(y[i])]]()[..., :3] / 255.0
        region = photo[top : top + height, left : left + width]
        expected = resize(region, (64, 64), order=1, anti_aliasing=True).transpose(2, 0, 1)
        expected = expected[:, :, ::-1] if flip else expected
        crop = x[i].numpy()
        assert np.abs(crop - expected).mean() < 0.03, i
        assert abs(crop.mean() - region.mean()) < 0.01, i


@pytest.mark.parametrize("split", ["train", "test", "fit", "validation"])
def test_train_and_test_crops_come_from_disjoint_regions(split):
    per_photo = 50 if split in ("test", "validation") else 200
    _, y, boxes = photos.photo_crops(split, size=16, per_photo=per_photo)
    for label, name in enumerate(SOURCES):
        height, width = SOURCES[name]().shape[:2]
        # The 4 x 4 checkerboard by hand: test cells where row + column is odd.
        rows = np.round(np.arange(5) * height / 4).astype(int)
        cols = np.round(np.arange(5) * width / 4).astype(int)
        cell_of_row = np.searchsorted(rows, np.arange(height), side="right") - 1
        cell_of_col = np.searchsorted(cols, np.arange(width), side="right") - 1
        is_test = (cell_of_row[:, None] + cell_of_col[None, :]) % 2 == 1
        cell_id = cell_of_row[:, None] * 4 + cell_of_col[None, :]
        # Validation: the training cells (1, 3) and (3, 3), the 4th and 8th of them row by row.
        held_out = np.isin(cell_id, [1 * 4 + 3, 3 * 4 + 3])
        allowed = {
            "train": ~is_test,
            "test": is_test,
            "fit": ~is_test & ~held_out,
            "validation": held_out,
        }[split]
        for top, left, h, w, _ in boxes[y.numpy() == label]:
            assert h == w and 0.15 * min(height, width) - 1 <= h <= 0.25 * min(height, width) + 1
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            assert allowed[top : top + h, left : left + w].all(), (name, top, left, h)
            assert len(np.unique(cell_id[top : top + h, left : left + w])) == 1


def test_an_unknown_split_is_refused_by_name():
    with pytest.raises(
        bs.InputError, match="unknown split 'val'; expected one of train, test, fit"
    ):
        photos.photo_crops("val", per_photo=1)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"size": 0}, "size must be an integer >= 1; got 0"),
        ({"size": 2.5}, "size must be an integer >= 1; got 2.5"),
        ({"per_photo": 0}, "per_photo must be an integer >= 1; got 0"),
    ],
)
def test_photo_crops_of_no_size_or_count_are_refused_in_one_line(options, said):
    with pytest.raises(bs.InputError, match=f"^{re.escape(said)}$"):
        photos.photo_crops("test", **options)


def test_photos_cnn_test_accuracy_is_the_documented_one(test_split):
    x, y = test_split
    model = bs.load_model("photos-cnn")
    with torch.no_grad():
        predicted = torch.cat([model(b).argmax(1) for b in x.split(100)])
    # 458 of 500, as printed by scripts/train_photos_cnn.py and stated in the README.
    assert int((predicted == y).sum()) == 458


def test_training_script_is_deterministic():
    def weights(seed):
        model = train(1, size=16, per_photo=6, max_steps=3, seed=seed, threads=1)
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, second, other = weights(0), weights(0), weights(1)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_folded_batch_norm_computes_the_trained_network_in_the_plain_architecture():
    torch.manual_seed(0)
    trained = with_batch_norm(photos.photos_cnn(16))
    for layer in trained:
        if isinstance(layer, torch.nn.BatchNorm2d):  # statistics as training leaves them
            for tensor in (layer.weight, layer.bias, layer.running_mean):
                tensor.data.normal_()
            layer.running_var.data.uniform_(0.1, 4.0)
    trained.eval()
    folded = fold_batch_norm(trained)
    plain = photos.photos_cnn(16)
    plain.load_state_dict(folded.state_dict())  # strict: the shipped layout, no BatchNorm left
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained(x), rtol=1e-6, atol=1e-6)


def test_training_takes_its_recipe_and_split():
    def weights(**kwargs):
        model = train(1, size=16, per_photo=6, max_steps=2, threads=1, **kwargs)
        return model.state_dict()

    plain, normed = weights(batch_norm=False), weights()
    fit, again = weights(split="fit"), weights(split="fit")
    assert list(plain) == list(normed) == list(fit)  # always the plain layout
    for key in ("0.weight", "13.weight"):
        assert not torch.equal(plain[key], normed[key])
        assert not torch.equal(normed[key], fit[key])
        torch.testing.assert_close(fit[key], again[key], rtol=0, atol=0)


def test_validation_run_prints_the_held_out_accuracy_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    trained, scored = [], []

    def recorded_train(*args, **kwargs):
        trained.append(kwargs)
        model = train(*args, **kwargs)
        trained.append(model)
        return model

    def recorded_crops(split, *args, **kwargs):
        scored.append(split)
        return photos.photo_crops(split, *args, **kwargs)

    monkeypatch.setattr(train_photos_cnn, "train", recorded_train)
    monkeypatch.setattr(train_photos_cnn, "photo_crops", recorded_crops)
    out = tmp_path / "weights.pt"
    argv = ["train_photos_cnn.py", "--validation", "--epochs", "1", "--per-photo", "6"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        train_photos_cnn.main()  # sets one thread for the whole process, as a script may
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert trained[0]["split"] == "fit" and trained[0]["batch_norm"] is True
    assert "validation" in scored and "test" not in scored and "train" not in scored
    x, y, _ = photos.photo_crops("validation")
    with torch.no_grad():
        hits = int((trained[1](x).argmax(1) == y).sum())
    assert f"validation accuracy {hits / 500:.4f} (500 images)" in printed
    assert "test accuracy" not in printed and not out.exists()


def test_photos_refuses_a_split_it_does_not_serve():
    with pytest.raises(bs.InputError, match="unknown split 'fit'; expected train, test or all"):
        photos.photos("fit")


@pytest.mark.parametrize("mode", [(False, False), (True, True)])
def test_training_gives_back_the_callers_deterministic_mode_and_threads(mode):
    def state():
        return (
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )

    saved = state()
    torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])
    torch.set_num_threads(2)
    try:
        train(1, size=16, per_photo=6, max_steps=1, threads=1)
        after = state()
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
    assert after == (2, *mode)


@pytest.mark.slow
def test_quick_demo_on_photos_writes_every_file_with_before_and_after(tmp_path):
    out = tmp_path / "run"
    argv = ["demo", "--out", str(out), "--quick", "-n", "2", "--steps", "3", "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["data"]) == ("photos-cnn", "photos")
    methods = sorted(bs.attack.ATTACK_DEFAULTS)
    results = read_jsonl(out / "results.jsonl")
    assert sorted((r["index"], r["method"]) for r in results) == [
        (i, m) for i in range(2) for m in methods
    ]
    for m in methods:
        with np.load(out / "arrays" / f"{m}-0.npz") as data:
            arrays = {k: data[k] for k in data.files}
        assert arrays["x"].shape == (2, 3, 64, 64)
        assert (out / "arrays" / f"sweep-{m}-0.npz").exists()
        for r in (r for r in results if r["method"] == m):
            i = r["index"]
            before = pearsonr(arrays["map_orig"][i].ravel(), arrays["map_target"][i].ravel())[0]
            assert r["expl_pcc_target_before"] == pytest.approx(before, abs=1e-4)
            change = np.abs(arrays["x_adv"][i] - arrays["x"][i]).max()
            assert r["input_max_change"] == pytest.approx(change, rel=1e-5, abs=1e-7)
    assert len(read_jsonl(out / "explain.jsonl")) == 2 * len(bs.METHODS)
    # photos-cnn's maps stay faithful only at large beta: the quick sweep reaches 50.
    assert config["betas"] == [1.0, 5.0, 20.0, 50.0]
    sweep = read_jsonl(out / "sweep.jsonl")
    assert sorted({r["beta"] for r in sweep}) == config["betas"]
    assert len(sweep) == 2 * len(methods) * 4 * 2
    assert "curves" in json.loads((out / "theory.json").read_text())
    html = (out / "report.html").read_text()
    assert "expl_pcc_target_before" in html and "input_max_change" in html
    # The theory's network checks run on digits-cnn: the report says so on a photos run.
    assert "not this run&#x27;s model (photos-cnn)" in html
    assert all(p.stat().st_size > 1000 for p in (out / "figures").glob("*.png"))


def test_photos_all_is_training_then_test():
    # The documented order of split "all" (training first), which
    # a user slicing x[3000:] for held-out crops relies on.
    x_all, y_all = photos.photos("all")
    x_tr, y_tr = photos.photos("train")
    x_te, y_te = photos.photos("test")
    assert x_all.shape[0] == len(x_tr) + len(x_te)
    torch.testing.assert_close(x_all[: len(x_tr)], x_tr, rtol=0, atol=0)
    torch.testing.assert_close(x_all[len(x_tr) :], x_te, rtol=0, atol=0)
    assert torch.equal(y_all, torch.cat([y_tr, y_te]))


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_split_draws_from_every_one_of_its_cells(split):
    # "both splits sample every part of the photograph": all 8 cells of the
    # split's half of the 4 x 4 checkerboard (by hand, as above) give crops.
    _, y, boxes = photos.photo_crops(split, size=16, per_photo=100)
    for label, name in enumerate(SOURCES):
        height, width = SOURCES[name]().shape[:2]
        rows = np.round(np.arange(5) * height / 4).astype(int)
        cols = np.round(np.arange(5) * width / 4).astype(int)
        cells = {
            (np.searchsorted(rows, top, side="right") - 1) * 4
            + np.searchsorted(cols, left, side="right")
            - 1
            for top, left, *_ in boxes[y.numpy() == label]
        }
        parity = 0 if split == "train" else 1
        assert cells == {r * 4 + c for r in range(4) for c in range(4) if (r + c) % 2 == parity}


def test_editing_returned_crops_in_place_leaves_the_next_call_unchanged():
    # The crops are cached: each call must hand out copies.
    x, y, boxes = photos.photo_crops("test", size=16, per_photo=2)
    kept = x.clone(), y.clone(), boxes.copy()
    x.mul_(0.0)
    y.fill_(-1)
    boxes[:] = 0
    again = photos.photo_crops("test", size=16, per_photo=2)
    torch.testing.assert_close(again[0], kept[0], rtol=0, atol=0)
    assert torch.equal(again[1], kept[1])
    np.testing.assert_array_equal(again[2], kept[2])


def test_crops_are_the_antialiased_bilinear_resize_of_their_box(test_split):
    # Oracle: PIL's bilinear resize of each channel (a triangle filter widened by the
    # scale, i.e. antialiased), flipped left-right where the box says so.
    x, y = test_split
    _, _, boxes = photos.photo_crops("test")
    for i in range(0, 500, 23):
        top, left, height, width, flip = boxes[i]
        photo = SOURCES[list(SOURCES)[int(y[i])]]()[..., :3].astype(np.float32) / 255.0
        region = photo[top : top + height, left : left + width]
        expected = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(region[..., c]), mode="F").resize(
                        (64, 64), Image.Resampling.BILINEAR
                    )
                )
                for c in range(3)
            ]
        )
        expected = expected[:, :, ::-1] if flip else expected
        np.testing.assert_allclose(x[i].numpy(), expected, rtol=0, atol=1e-5, err_msg=str(i))


def test_crop_sides_are_the_documented_fractions_of_the_shorter_side(test_split):
    # 15, 20 or 25 % of the shorter side, rounded, each of them used; at most one cell.
    _, y, boxes = photos.photo_crops("test")
    for label, name in enumerate(SOURCES):
        height, width = SOURCES[name]().shape[:2]
        scaled = {round(s * min(height, width)) for s in (0.15, 0.2, 0.25)}
        cells = {int(d) for n in (height, width) for d in np.diff(np.round(np.arange(5) * n / 4))}
        sides = set(boxes[y.numpy() == label][:, 2].tolist())
        assert sides <= scaled | cells, (name, sorted(sides))
        assert sorted(scaled)[:2] == sorted(sides)[:2], (name, sorted(sides))


def test_half_the_crops_are_flipped_and_none_is_almost_uniform(test_split):
    x, _ = test_split
    _, _, boxes = photos.photo_crops("test")
    # Flipped with probability one half: 500 draws, a binomial's sd is 0.022.
    assert 0.4 <= boxes[:, 4].mean() <= 0.6
    # Crops of standard deviation below 0.02 (the black of the retina and the sky) are drawn again.
    assert np.std(x.numpy().reshape(500, -1), axis=1, ddof=1).min() >= 0.02


def _hand_cells(height, width, split):
    """The split's cells of the 4 x 4 checkerboard, by hand as ``split_cells`` documents."""
    rows = np.round(np.arange(5) * height / 4).astype(int)
    cols = np.round(np.arange(5) * width / 4).astype(int)
    parity = 1 if split == "test" else 0
    cells = [
        (int(rows[r]), int(cols[c]), int(rows[r + 1]), int(cols[c + 1]))
        for r in range(4)
        for c in range(4)
        if (r + c) % 2 == parity
    ]
    if split in ("fit", "validation"):
        # Every fourth training cell, row by row, is held out for validation.
        return [c for k, c in enumerate(cells) if (k % 4 == 3) == (split == "validation")]
    return cells


@pytest.mark.parametrize("split", ["train", "test", "fit", "validation"])
@pytest.mark.parametrize(("height", "width"), [(300, 451), (30, 45), (37, 26), (9, 10), (4, 4)])
def test_split_cells_is_the_checkerboard_by_hand_at_odd_sizes(height, width, split):
    # Odd sizes where k * n / 4 ends in .5 or .75: the boundaries are rounded, not floored,
    # rows and columns are not swapped, and cells go row by row.
    assert photos.split_cells(height, width, split) == _hand_cells(height, width, split)


# Synthetic photographs for the crop pipeline: odd, non-square sizes (a quarter of the
# shorter side is more than some cells, or less), one with an alpha channel that must be
# dropped. The top row of cells has a faint texture (crops of standard deviation about
# 0.005 to 0.019 after resizing, below the 0.02 threshold), the rest strong noise.
SYNTHETIC_SHAPES = [(30, 45, 4), (37, 30, 3), (37, 26, 3), (32, 32, 3)]


def _synthetic_photo(shape, seed):
    rng = np.random.default_rng(seed)
    image = 0.5 + 0.3 * rng.standard_normal(shape)
    faint = int(np.round(shape[0] / 4))
    image[:faint] = 0.5 + 0.015 * rng.standard_normal((faint, *shape[1:]))
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


@pytest.fixture
def synthetic_photos(monkeypatch):
    """Replace the built-in photographs by small synthetic ones, caches emptied around the test."""
    images = {f"p{i}": _synthetic_photo(shape, i) for i, shape in enumerate(SYNTHETIC_SHAPES)}
    monkeypatch.setattr(photos, "PHOTOS", {k: (lambda v=v: v.copy()) for k, v in images.items()})
    photos._photographs.cache_clear()
    photos._crops.cache_clear()
    yield list(images.values())
    photos._photographs.cache_clear()
    photos._crops.cache_clear()


@pytest.mark.parametrize("split", ["train", "test"])
def test_crops_of_synthetic_photos_match_a_hand_built_oracle(synthetic_photos, split):
    per_photo, size = 40, 5
    x, y, boxes = photos.photo_crops(split, size=size, per_photo=per_photo)
    n = len(SYNTHETIC_SHAPES)
    assert x.shape == (n * per_photo, 3, size, size)
    np.testing.assert_array_equal(y.numpy(), np.tile(np.arange(n), per_photo))
    flips = set()
    for label, image in enumerate(synthetic_photos):
        height, width = image.shape[:2]
        cells = _hand_cells(height, width, split)
        rgb = image[..., :3].astype(np.float32) / 255.0
        hit, touched = set(), set()
        for i in np.flatnonzero(y.numpy() == label):
            top, left, side, side_w, flip = (int(v) for v in boxes[i])
            inside = [
                c
                for c in cells
                if c[0] <= top and top + side <= c[2] and c[1] <= left and left + side <= c[3]
            ]
            assert side == side_w and len(inside) == 1, (label, boxes[i])
            cell = inside[0]
            # 15, 20 or 25 % of the shorter side, rounded, at most the cell.
            assert side in {
                min(round(s * min(height, width)), cell[2] - cell[0], cell[3] - cell[1])
                for s in (0.15, 0.2, 0.25)
            }
            assert cell[0] > 0, "a crop of the faint top row was kept"
            hit.add(cell)
            touched |= {("top", top == cell[0]), ("bottom", top + side == cell[2])}
            touched |= {("left", left == cell[1]), ("right", left + side == cell[3])}
            flips.add(flip)
            # Oracle: PIL's bilinear (antialiased) resize of each RGB channel of the box.
            region = rgb[top : top + side, left : left + side]
            expected = np.stack(
                [
                    np.asarray(
                        Image.fromarray(np.ascontiguousarray(region[..., c]), mode="F").resize(
                            (size, size), Image.Resampling.BILINEAR
                        )
                    )
                    for c in range(3)
                ]
            )
            expected = expected[:, :, ::-1] if flip else expected
            np.testing.assert_allclose(x[i].numpy(), expected, rtol=0, atol=1e-5)
        # Every cell below the faint row gives crops, and crops reach every edge of a cell.
        assert hit == {c for c in cells if c[0] > 0}
        assert {k for k, v in touched if v} == {"top", "bottom", "left", "right"}
    assert flips == {0, 1}


def test_photo_crops_defaults_are_the_documented_split_and_counts(synthetic_photos, monkeypatch):
    # Default split "test"; 300 crops per photograph for train and fit, 50 for test and validation.
    # One photograph is enough and keeps the test fast.
    monkeypatch.setattr(photos, "PHOTOS", dict(list(photos.PHOTOS.items())[:1]))
    for split, count in [("fit", 300), ("validation", 50)]:
        x, y, boxes = photos.photo_crops(split, size=2)
        assert (len(x), len(y), len(boxes)) == (count,) * 3, split
    default = photos.photo_crops(size=2)[2]
    assert len(default) == 50
    np.testing.assert_array_equal(default, photos.photo_crops("test", size=2)[2])
