"""Map similarity against scikit-image, scipy and numpy oracles."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage, stats
from skimage.metrics import structural_similarity

import betasmooth as bs
from betasmooth.metrics import (
    METRICS,
    center_of_mass,
    com_shift,
    compare,
    default_k,
    group_records,
    heatmap,
    medians,
    mse,
    pcc,
    register_metric,
    resolve_k,
    spearman,
    ssim,
    ssim_window,
    topk_intersection,
)
from betasmooth.validate import InputError, InputTypeError

SIZES = [(16, 16), (32, 32), (7, 9)]


def _pairs(shape: tuple[int, int], dtype: torch.dtype = torch.float64) -> tuple:
    """Random, correlated, anti-correlated, tied and constant pairs in one batch."""
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    a = torch.rand(6, *shape, generator=g, dtype=dtype)
    b = torch.rand(6, *shape, generator=g, dtype=dtype)
    b[1] = a[1] + 0.2 * b[1]
    b[2] = -a[2] + 0.1 * b[2]
    a[3] = torch.floor(4 * a[3]) / 4  # few distinct values: many ties
    b[3] = torch.floor(3 * b[3]) / 3
    b[4] = 0.5  # one constant map
    a[5], b[5] = 0.25, 0.25  # two equal constant maps
    return a, b


def _skimage_ssim(x: np.ndarray, y: np.ndarray) -> float:
    data_range = max(x.max(), y.max()) - min(x.min(), y.min())
    if data_range == 0:
        return float("nan")  # 0 / 0 in skimage; the convention is tested on its own
    return structural_similarity(
        x,
        y,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        win_size=ssim_window(*x.shape),
    )


@pytest.mark.parametrize("shape", SIZES)
def test_ssim_equals_skimage(shape):
    a, b = _pairs(shape)
    ours = ssim(a, b)
    for i in range(5):
        assert ours[i].item() == pytest.approx(_skimage_ssim(a[i].numpy(), b[i].numpy()), abs=1e-4)
    assert ours[5].item() == 1.0


def test_ssim_float32_and_small_heatmaps_match_skimage():
    # Attack maps sum to 1: values near 1e-3, where float32 variances are delicate.
    a, b = _pairs((32, 32))
    a, b = a / a.sum((1, 2), keepdim=True), b / b.sum((1, 2), keepdim=True)
    ours = ssim(a[:5].float(), b[:5].float())
    for i in range(5):
        assert ours[i].item() == pytest.approx(_skimage_ssim(a[i].numpy(), b[i].numpy()), abs=1e-4)


@pytest.mark.parametrize(("offset", "spread"), [(1, 1e-2), (1, 1e-3), (1, 1e-4), (1000, 1e-5)])
def test_ssim_float32_of_nearly_flat_maps_matches_skimage(offset, spread):
    # An offset far above the spread: G(x^2) - G(x)^2 would cancel every digit
    # of the local variance in float32, and so would rounding each value.
    gen = torch.Generator().manual_seed(7)
    a = offset * (1 + spread * torch.rand(3, 32, 32, generator=gen, dtype=torch.float64))
    b = offset * (1 + spread * torch.rand(3, 32, 32, generator=gen, dtype=torch.float64))
    b[1] = a[1] + 0.3 * (b[1] - offset)  # correlated, for an SSIM well above 0
    ours = ssim(a.float(), b.float())
    for i in range(3):
        ref = _skimage_ssim(a[i].float().double().numpy(), b[i].float().double().numpy())
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


def test_ssim_float32_of_nearly_flat_maps_at_different_offsets_matches_skimage():
    # Each map is centred on its own mean: taken about the other map's mean, the
    # offset between them would cancel digits of the local (co)variances in float32.
    gen = torch.Generator().manual_seed(7)
    a = 1 + 0.05 * torch.rand(3, 32, 32, generator=gen, dtype=torch.float64)
    b = 2 + 0.05 * torch.rand(3, 32, 32, generator=gen, dtype=torch.float64)
    b[1] = 2 + (a[1] - 1) + 0.3 * (b[1] - 2)  # correlated, for an SSIM well above 0
    ours = ssim(a.float(), b.float())
    for i in range(3):
        ref = _skimage_ssim(a[i].float().double().numpy(), b[i].float().double().numpy())
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)


def test_ssim_window_is_skimage_default_for_large_maps():
    # skimage's own window (win_size=None) for maps of at least 11 pixels a side.
    a, b = _pairs((12, 20))
    x, y = a[0].numpy(), b[0].numpy()
    r = max(x.max(), y.max()) - min(x.min(), y.min())
    ref = structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=r
    )
    assert ssim(a[:1], b[:1]).item() == pytest.approx(ref, abs=1e-10)
    assert (ssim_window(12, 20), ssim_window(7, 9), ssim_window(8, 8), ssim_window(1, 5)) == (
        11,
        7,
        7,
        1,
    )


def test_ssim_one_constant_map_is_finite_and_matches_skimage():
    a = torch.rand(1, 16, 16, dtype=torch.float64)
    b = torch.full_like(a, 0.3)
    ref = _skimage_ssim(a[0].numpy(), b[0].numpy())
    assert ssim(a, b).item() == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize(("scale_a", "scale_b"), [(1.0, 3e38), (1e-30, 1.0)])
def test_ssim_of_float32_maps_of_very_different_scales_matches_skimage(scale_a, scale_b):
    # The common scale is taken from the larger of the two maps, whichever it is:
    # from the smaller alone, the larger would overflow float32 once divided by it.
    gen = torch.Generator().manual_seed(6)
    a, b = (2 * torch.rand(2, 16, 16, generator=gen, dtype=torch.float64) - 1 for _ in "ab")
    a, b = scale_a * a, scale_b * b
    ours = ssim(a.float(), b.float())
    for i in range(2):
        ref = _skimage_ssim(a[i].numpy(), b[i].numpy())
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30, 3e38])
def test_ssim_and_centre_of_mass_of_float32_maps_at_any_scale(scale):
    # Near float32's largest value the joint range and the sum of a map
    # overflow; both measures are unchanged by a common scale.
    gen = torch.Generator().manual_seed(6)
    # In [-1, 1]: at the largest scale the joint range is twice float32's largest value.
    a, b = (2 * torch.rand(4, 16, 16, generator=gen, dtype=torch.float64) - 1 for _ in "ab")
    ours = ssim((scale * a).float(), (scale * b).float())
    centres = center_of_mass((scale * a).float())
    for i in range(4):
        ref = _skimage_ssim(a[i].numpy(), b[i].numpy())
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
        ref = ndimage.center_of_mass(np.abs(a[i].numpy()))
        np.testing.assert_allclose(centres[i].double().numpy(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", SIZES)
def test_pcc_equals_scipy_pearsonr(shape):
    a, b = _pairs(shape)
    ours = pcc(a, b)
    for i in range(4):
        ref = stats.pearsonr(a[i].numpy().ravel(), b[i].numpy().ravel()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-12)
    assert ours[4].item() == 0.0  # one constant map
    assert ours[5].item() == 1.0  # two constant maps


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [(torch.float32, s) for s in (1e-30, 1e-10, 1.0, 1e12, 1e30)]
    + [(torch.float64, s) for s in (1e-160, 1e160)],
)
def test_pcc_equals_scipy_at_any_scale(dtype, scale):
    # Heatmaps sum to 1; scaled, their squares and products flush to zero or overflow.
    a, b = _pairs((16, 16))
    a, b = heatmap(a[:4, None]), heatmap(b[:4, None])
    a, b = (scale * a).to(dtype), (scale * b).to(dtype)
    ours = pcc(a, b)
    for i in range(4):
        u, v = a[i].double().numpy().ravel(), b[i].double().numpy().ravel()
        ref = stats.pearsonr(u, v).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pcc_of_float32_maps_near_the_largest_value_equals_scipy(sign):
    # Values near float32's largest (3.4e38): their plain sum, and so their mean, is inf.
    # Negative too (signed maps, reduction="sum"): the scale is the largest |value|.
    a, b = _pairs((16, 16))
    a, b = (sign * 3e38 * a[:3] / a[:3].amax((1, 2), keepdim=True)).float(), b[:3].float()
    assert not bool(torch.isfinite(a.flatten(1).sum(1)).all())
    ours = pcc(a, b)
    for i in range(3):
        u, v = a[i].double().numpy().ravel(), b[i].double().numpy().ravel()
        assert ours[i].item() == pytest.approx(stats.pearsonr(u, v).statistic, abs=1e-5)


def test_pcc_of_affinely_related_float32_maps_is_at_most_one():
    # r(a, c a + d) = 1 exactly; float32 rounding of its sums alone gives up to 1 + 1.2e-7
    # (0.7 a of seed 0, 1.1 a + 0.01 of seed 2, exp(log(a)) of seed 1, ...).
    a = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))
    for b in (0.7 * a, 1.1 * a + 0.01, a.exp().log(), 3 * a + 1):
        r = pcc(a, b)
        assert bool((r <= 1.0).all())
        torch.testing.assert_close(r, torch.ones(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e-30),
        (torch.float32, 1e30),
        (torch.float64, 1e-160),
        (torch.float64, 1e160),
    ],
)
def test_pcc_gradient_does_not_depend_on_the_scale(dtype, scale):
    # pcc(s a, b) = pcc(a, b), so its gradient in a is the same at every s > 0:
    # the float64 gradient at s = 1 (checked by gradcheck below) is the oracle.
    a, b = _pairs((6, 6))
    a64 = a[:3].clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(pcc(a64, b[:3]).sum(), a64)
    a = a[:3].to(dtype).requires_grad_(True)
    (scaled,) = torch.autograd.grad(pcc(scale * a, b[:3].to(dtype)).sum(), a)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(scaled.double(), plain, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SIZES)
def test_spearman_equals_scipy_with_ties(shape):
    a, b = _pairs(shape)
    ours = spearman(a, b)
    for i in range(4):
        ref = stats.spearmanr(a[i].numpy().ravel(), b[i].numpy().ravel()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-12)
    assert len(np.unique(a[3].numpy())) <= 4  # the tied pair really is tied
    assert ours[4].item() == 0.0
    assert ours[5].item() == 1.0


def test_spearman_ranks_are_scipy_rankdata_average():
    from betasmooth.metrics import _average_ranks

    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 0.0]])
    expected = stats.rankdata(x[0].numpy(), method="average")
    np.testing.assert_array_equal(_average_ranks(x)[0].numpy(), expected)


def _numpy_topk(x: np.ndarray, k: int) -> set[int]:
    # Stable descending order: equal values keep row-major order.
    return set(np.argsort(-x.ravel(), kind="stable")[:k].tolist())


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("k", [None, 1, 5])
def test_topk_equals_numpy(shape, k):
    a, b = _pairs(shape)
    ours = topk_intersection(a, b, k=k)
    kk = default_k(*shape) if k is None else k
    for i in range(6):
        ref = len(_numpy_topk(a[i].numpy(), kk) & _numpy_topk(b[i].numpy(), kk)) / kk
        assert ours[i].item() == pytest.approx(ref, abs=1e-12)
    assert ours[5].item() == 1.0


def test_topk_by_hand_and_default_k():
    a = torch.tensor([[[5.0, 4.0, 0.0], [0.0, 3.0, 1.0]]])
    b = torch.tensor([[[5.0, 0.0, 4.0], [1.0, 3.0, 0.0]]])
    # top-2 of a: {0, 1}; of b: {0, 2} -> 1 shared; top-3: {0,1,4} vs {0,2,4} -> 2 shared
    assert topk_intersection(a, b, k=2).item() == 0.5
    assert topk_intersection(a, b, k=3).item() == pytest.approx(2 / 3)
    # ties: the lower index wins, so the two all-tied maps pick the same pixels
    tied = torch.ones(1, 2, 3)
    assert topk_intersection(tied, a, k=2).item() == 1.0
    # ties at the k-th value behind a larger one: only k - 1 of them are in.
    # top-2 of c: {0, 1}; of b: {0, 2} -> 1 shared
    c = torch.tensor([[[5.0, 4.0, 4.0], [4.0, 0.0, 0.0]]])
    assert topk_intersection(c, b, k=2).item() == 0.5
    assert topk_intersection(b, c, k=2).item() == 0.5
    # 10 % of the pixels, rounded down (4.9 -> 4)
    assert (default_k(32, 32), default_k(7, 9), default_k(7, 7), default_k(2, 2)) == (
        102,
        6,
        4,
        1,
    )


@pytest.mark.parametrize("k", [0, 17, 2.5, True])
def test_topk_bad_k(k):
    with pytest.raises(InputError, match="k must be an int between 1 and H \\* W = 16"):
        topk_intersection(torch.rand(1, 4, 4), torch.rand(1, 4, 4), k=k)


def test_topk_of_every_pixel_is_allowed_and_counts_all_of_them():
    # k = H * W is the largest k the docstring allows: every pixel is in both sets.
    a, b = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert resolve_k(16, 4, 4) == 16
    assert topk_intersection(a, b, k=16).tolist() == [1.0]


@pytest.mark.parametrize("shape", SIZES)
def test_center_of_mass_equals_scipy(shape):
    a, b = _pairs(shape)
    a = a - 0.5  # signed maps: the centre is that of |a|
    ours = center_of_mass(a)
    for i in range(6):
        ref = ndimage.center_of_mass(np.abs(a[i].numpy()))
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-10)
    shift = com_shift(a, b)
    for i in range(6):
        ca = np.array(ndimage.center_of_mass(np.abs(a[i].numpy())))
        cb = np.array(ndimage.center_of_mass(np.abs(b[i].numpy())))
        assert shift[i].item() == pytest.approx(np.linalg.norm(ca - cb), abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_maps_of_224_px_match_scipy(dtype):
    # float16's sums of squares pass 65504 and bfloat16 rounds a centre near
    # row 111 to 111.5, unless the metrics work in float32.
    g = torch.Generator().manual_seed(0)
    e = torch.rand(2, 1, 224, 224, generator=g) ** 4
    a = heatmap(e).to(dtype)
    b = heatmap(e + 0.3 * torch.rand(e.shape, generator=g) ** 4).to(dtype)
    u, v = a.double().numpy(), b.double().numpy()
    ours = compare(a, b)
    for i in range(2):
        ref = stats.pearsonr(u[i].ravel(), v[i].ravel()).statistic
        assert ours["pcc"][i].item() == pytest.approx(ref, abs=1e-5)
        centres = [np.array(ndimage.center_of_mass(m[i])) for m in (u, v)]
        np.testing.assert_allclose(center_of_mass(a)[i].numpy(), centres[0], atol=1e-3)
        assert ours["com_shift"][i].item() == pytest.approx(
            np.linalg.norm(centres[0] - centres[1]), abs=1e-3
        )
        assert ours["mse"][i].item() == pytest.approx(((u[i] - v[i]) ** 2).mean(), rel=1e-4)


def test_center_of_mass_of_zero_map_is_grid_centre():
    m = torch.zeros(2, 7, 9)
    m[1, 6, 8] = 2.0
    np.testing.assert_array_equal(center_of_mass(m).numpy(), [[3.0, 4.0], [6.0, 8.0]])
    assert com_shift(m[:1], m[1:]).item() == pytest.approx(np.hypot(3, 4))


def test_mse_by_hand():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    b = torch.tensor([[[1.0, 0.0], [3.0, 8.0]]])
    assert mse(a, b).item() == pytest.approx((4 + 16) / 4)


def test_compare_iterates_the_registry():
    a, b = _pairs((16, 16))
    out = compare(a, b, k=7)
    assert list(out) == list(METRICS) == ["mse", "ssim", "pcc", "spearman", "topk", "com_shift"]
    assert all(v.shape == (6,) and bool(torch.isfinite(v).all()) for v in out.values())
    torch.testing.assert_close(out["topk"], topk_intersection(a, b, k=7))
    torch.testing.assert_close(out["ssim"], ssim(a, b))
    assert bs.compare is compare


def test_compare_takes_the_maps_by_the_designs_names():
    # The public contract: bs.compare(map_a, map_b); by keyword too, with scipy's PCC
    # and Spearman of each pair (the pairs without a constant map, which scipy leaves NaN).
    a, b = (m[:4] for m in _pairs((16, 16)))
    out = bs.compare(map_b=b, map_a=a)
    pcc = [stats.pearsonr(u.ravel(), v.ravel())[0] for u, v in zip(a.numpy(), b.numpy())]
    rho = [stats.spearmanr(u.ravel(), v.ravel())[0] for u, v in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(out["pcc"].numpy(), pcc, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["spearman"].numpy(), rho, rtol=1e-4, atol=1e-6)


def test_compare_never_nan_on_constant_maps():
    zero, one = torch.zeros(2, 8, 8), torch.ones(2, 8, 8)
    for x, y in [(zero, zero), (zero, one), (one, torch.rand(2, 8, 8))]:
        out = compare(x, y)
        assert all(bool(torch.isfinite(v).all()) for v in out.values())
    same = compare(one, one)
    assert [same[n][0].item() for n in ("mse", "ssim", "pcc", "spearman", "topk", "com_shift")] == [
        0.0,
        1.0,
        1.0,
        1.0,
        1.0,
        0.0,
    ]


@pytest.mark.parametrize("fn", [mse, pcc, ssim])
@pytest.mark.parametrize(("batch", "shape"), [(2, (6, 6)), (1, (12, 11))])
def test_gradients_match_finite_differences(fn, batch, shape):
    a = torch.rand(batch, *shape, dtype=torch.float64, requires_grad=True)
    b = torch.rand(batch, *shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fn(x, b), (a,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda y: fn(b.detach(), y), (a,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcc_gradient_is_zero_at_constant_maps_and_unchanged_elsewhere(dtype):
    # pcc is 0 near a map with one constant side and 1 with both: constant in
    # the other map, so its gradient there is zero; other rows keep theirs.
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(3, 5, 6, generator=gen, dtype=dtype)
    b = torch.rand(3, 5, 6, generator=gen, dtype=dtype)
    a[0] = 0.5
    a[1], b[1] = 0.25, 0.0
    a.requires_grad_(True)
    b.requires_grad_(True)
    pcc(a, b).sum().backward()
    alone_a = a[2:].detach().clone().requires_grad_(True)
    alone_b = b[2:].detach().clone().requires_grad_(True)
    pcc(alone_a, alone_b).sum().backward()
    for grad, alone in ((a.grad, alone_a.grad), (b.grad, alone_b.grad)):
        assert torch.equal(grad[:2], torch.zeros_like(grad[:2]))
        torch.testing.assert_close(grad[2:], alone)


def test_ssim_and_centre_of_mass_gradients_at_their_conventions_are_zero():
    # SSIM of two equal constant maps is 1, its largest value, and the centre of
    # an all-zero map is the grid centre: defined values, whose gradients are 0,
    # not the NaN of a 0 / 0 in the branch that torch.where leaves out.
    a = torch.full((2, 8, 8), 0.25, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ssim(a, torch.full((2, 8, 8), 0.25)).sum(), a)
    assert torch.equal(grad, torch.zeros_like(grad))
    m = torch.zeros(2, 5, 7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(center_of_mass(m).sum(), m)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_center_of_mass_gradient_matches_finite_differences():
    m = torch.rand(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(center_of_mass, (m,), eps=1e-6, atol=1e-6)


def test_heatmap_by_hand():
    e = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]]])
    expected = torch.tensor([[[2.0, 2.0], [2.0, 4.0]]]) / 10
    torch.testing.assert_close(heatmap(e), expected)
    torch.testing.assert_close(heatmap(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 2, 2))


@pytest.mark.parametrize(
    ("reduction", "reduce"),
    [
        ("abs_sum", lambda h: np.abs(h).sum(1)),
        ("sum", lambda h: h.sum(1)),
        ("pos", lambda h: np.maximum(h.sum(1), 0)),
        ("l2", lambda h: np.sqrt(np.square(h).sum(1))),
    ],
)
def test_heatmap_reductions_against_numpy(reduction, reduce):
    h = np.random.default_rng(0).normal(size=(3, 3, 5, 6))
    expected = reduce(h)
    expected /= np.abs(expected).sum((1, 2), keepdims=True)
    maps = heatmap(torch.from_numpy(h), reduction=reduction)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-12)


def test_heatmap_eps_zeroes_only_the_maps_of_small_total():
    # Item 0: |values| sum to 0.5 <= eps, the map becomes all zero; item 1: sum 4 > eps.
    e = torch.tensor([[[[0.1, -0.1], [0.2, 0.1]]], [[[1.0, -1.0], [1.0, 1.0]]]])
    maps = heatmap(e, eps=1.0)
    torch.testing.assert_close(maps[0], torch.zeros(2, 2))
    torch.testing.assert_close(maps[1], torch.full((2, 2), 0.25))
    torch.testing.assert_close(heatmap(e)[0], torch.tensor([[0.2, 0.2], [0.4, 0.2]]))


@pytest.mark.parametrize("scale", [1e-14, 1e-30, 1e30])
def test_heatmap_of_tiny_or_huge_values_sums_to_one(scale):
    # Gradients of a logit near 0 can be this small; the map is still a map.
    e = torch.rand(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    maps = heatmap(e * scale)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(maps, heatmap(e))


@pytest.mark.parametrize(
    ("dtype", "value", "reduction"),
    [
        (torch.float16, 1.0, "abs_sum"),  # sums to 150528 > 65504 at 224 px
        (torch.bfloat16, 1.0, "abs_sum"),
        (torch.float32, 1e36, "abs_sum"),
        (torch.float32, 3e38, "abs_sum"),  # the channel sum itself overflows
        (torch.float32, 1e20, "l2"),  # the squares overflow
        (torch.float32, 1e36, "sum"),
    ],
)
def test_heatmap_near_the_dtype_largest_value_is_still_the_map(dtype, value, reduction):
    e = torch.rand(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e[1] = 1.0  # the uniform map: 1 / 50176 in every pixel
    expected = heatmap(e, reduction=reduction)
    maps = heatmap((e * value).to(dtype), reduction=reduction)
    assert maps.dtype == dtype
    # float16 keeps 11 bits: the values 1e-5 are held to about 1e-8.
    atol = {torch.float16: 2e-8, torch.bfloat16: 2e-7}.get(dtype, 1e-11)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-2, atol=atol)
    torch.testing.assert_close(
        maps[1].double().sum(), torch.tensor(1.0).double(), rtol=1e-2, atol=0
    )


def test_heatmap_of_an_overflowing_sum_keeps_the_scales_of_the_channels():
    # The rescue from overflow divides the whole explanation by one number: channels
    # 10x and 100x smaller than the first keep their share of each pixel.
    e = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = e * torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64).view(1, 3, 1, 1)
    maps = heatmap((3e38 * e).float())
    torch.testing.assert_close(maps.double(), heatmap(e), rtol=1e-5, atol=1e-9)


def test_heatmap_rescues_an_overflowing_item_without_touching_the_others():
    # Each item is divided by its own largest value: divided by the batch's, an ordinary
    # item would lose its digits and a tiny one would flush to zero in float32.
    e = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scales = torch.tensor([3e38, 1.0, 1e-30], dtype=torch.float64).view(3, 1, 1, 1)
    maps = heatmap((e * scales).float())
    expected = np.abs(e.numpy()).sum(1)
    expected /= expected.sum((1, 2), keepdims=True)
    np.testing.assert_allclose(maps.double().numpy(), expected, rtol=1e-5, atol=0)


def test_heatmap_of_a_total_below_the_smallest_normal_number_is_zero():
    # The documented convention: a float32 map whose |values| sum to less than 1.2e-38
    # is all zero, with a zero derivative (1 / total^2 overflows there, to inf and NaN).
    # Item 1 sums to 16x the smallest normal number: an ordinary map of 1/4s.
    tiny = torch.finfo(torch.float32).tiny
    e = torch.tensor([tiny / 8, 2 * tiny]).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    e.requires_grad_(True)
    maps = heatmap(e)
    assert torch.equal(maps[0], torch.zeros(2, 2))
    assert torch.equal(maps[1], torch.full((2, 2), 0.25))
    weights = torch.arange(8.0).view(2, 2, 2)
    (grad,) = torch.autograd.grad((maps * weights).sum(), e)
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))
    assert bool(torch.isfinite(grad).all())


def test_heatmap_derivative_at_an_all_zero_map_is_zero():
    # The attack differentiates through heatmap: an all-zero map must not give 0 / 0.
    zero = torch.zeros(1, 3, 4, 4, requires_grad=True)
    heatmap(zero).sum().backward()
    assert torch.equal(zero.grad, torch.zeros_like(zero))
    e = torch.rand(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: heatmap(h, reduction="sum"), (e - 0.5,))


@pytest.mark.parametrize(
    ("a", "b", "error", "message"),
    [
        (torch.rand(2, 8, 8), torch.rand(2, 8, 9), InputError, r"same shape .* \(2, 8, 9\)"),
        # Batches of 2 and 1 maps would broadcast to 2 scores without a word.
        (torch.rand(2, 8, 8), torch.rand(1, 8, 8), InputError, r"same shape .* \(1, 8, 8\)"),
        (
            torch.rand(8, 8),
            torch.rand(8, 8),
            InputError,
            r"map a must have shape \(B, H, W\), one map per batch item; got shape \(8, 8\)$",
        ),
        (
            torch.rand(2, 0, 8),
            torch.rand(2, 0, 8),
            InputError,
            r"map a holds empty maps, shape \(2, 0, 8\); expected \(B, H, W\) with H, W >= 1",
        ),
        (
            torch.rand(2, 8, 8),
            torch.rand(2, 8, 0),
            InputError,
            r"map b holds empty maps, shape \(2, 8, 0\)",
        ),
        (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), InputError, r"shape \(B, H, W\)"),
        (
            torch.rand(2, 8, 8),
            torch.full((2, 8, 8), float("nan")),
            InputError,
            "map b contains NaN or inf",
        ),
        (torch.rand(2, 8, 8), torch.ones(2, 8, 8, dtype=torch.long), InputTypeError, "floating"),
        (np.zeros((2, 8, 8)), torch.rand(2, 8, 8), InputTypeError, "map a must be a torch.Tensor"),
    ],
)
def test_bad_input(a, b, error, message):
    for fn in [compare, *METRICS.values()]:
        with pytest.raises(error, match=message):
            fn(a, b)


def test_heatmap_bad_input():
    with pytest.raises(InputError, match=r"shape \(B, C, H, W\)"):
        heatmap(torch.rand(1, 1, 2, 2, 2))
    # eps is a threshold on a map's total: a number, at least 0 and finite.
    for eps in ("1", -0.1, float("nan"), float("inf"), True):
        with pytest.raises(InputError, match=r"^eps must be a finite number >= 0; got"):
            heatmap(torch.rand(1, 1, 2, 2), eps)
    h = torch.tensor([[[[1.0, 3.0]]]])
    torch.testing.assert_close(heatmap(h, 4.0), torch.zeros(1, 1, 2))  # total 4 is not > 4
    torch.testing.assert_close(heatmap(h, 3.9), torch.tensor([[[0.25, 0.75]]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b = _pairs((16, 16), torch.float32)
    cpu = compare(a, b)
    gpu = compare(a.cuda(), b.cuda())
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], atol=1e-5, rtol=1e-5)


maps = st.builds(
    lambda h, w, seed, levels: _hyp_map(h, w, seed, levels),
    st.integers(1, 14),
    st.integers(2, 14),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0, 2, 5]),
)


def _hyp_map(h: int, w: int, seed: int, levels: int) -> torch.Tensor:
    m = torch.rand(2, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.floor(m * levels) / levels if levels else m


@settings(max_examples=25, deadline=None, derandomize=True)
@given(maps)
def test_identity_properties(a):
    assert torch.allclose(pcc(a, a), torch.ones(2, dtype=a.dtype))
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=a.dtype))
    assert torch.allclose(spearman(a, a), torch.ones(2, dtype=a.dtype))
    assert torch.equal(topk_intersection(a, a), torch.ones(2, dtype=a.dtype))
    assert torch.equal(mse(a, a), torch.zeros(2, dtype=a.dtype))
    assert torch.equal(com_shift(a, a), torch.zeros(2, dtype=a.dtype))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(maps, st.integers(0, 2**31 - 1))
def test_symmetry_and_range(a, seed):
    b = _hyp_map(a.shape[1], a.shape[2], seed, 0)
    ab, ba = compare(a, b), compare(b, a)
    for name in ab:
        torch.testing.assert_close(ab[name], ba[name], atol=1e-12, rtol=0)
    for name in ("ssim", "pcc", "spearman"):
        assert bool((ab[name].abs() <= 1 + 1e-12).all())
    assert bool(((ab["topk"] >= 0) & (ab["topk"] <= 1)).all())


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (lambda a: a.sum(), r"shape \(\)"),
        (lambda a: [0.0] * len(a), "list"),
        (lambda a: a.sum((1, 2))[:2], r"shape \(2,\)"),
    ],
)
def test_a_metric_that_gives_no_number_per_map_is_named(value, got):
    register_metric("per_batch")(lambda a, b: value(a))
    try:
        with pytest.raises(
            InputError, match=rf"^metric 'per_batch' returned {got}; expected .*\(3,\)"
        ):
            compare(torch.rand(3, 4, 4), torch.rand(3, 4, 4))
    finally:
        del METRICS["per_batch"]
    with pytest.raises(InputError, match="metric 'pcc' is registered already"):
        register_metric("pcc")(lambda a, b: a.sum((1, 2)))


def test_a_metric_that_gives_nan_for_finite_maps_is_named():
    # Cosine similarity of the maps' deviations from their means: 0 / 0 for a constant
    # map (the first pair), defined for the second. Oracle: numpy by hand.
    @register_metric("centred_cosine")
    def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
        b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    a = torch.stack([torch.ones(4, 4), torch.arange(16.0).view(4, 4)]).double()
    b = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        with pytest.warns(UserWarning, match=r"^metric 'centred_cosine' gave NaN or inf for"):
            got = compare(a, b)["centred_cosine"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the built-in metrics of these maps are finite
            del METRICS["centred_cosine"]
            compare(a, b)
    finally:
        METRICS.pop("centred_cosine", None)
    u, v = a[1].numpy().ravel(), b[1].numpy().ravel()
    u, v = u - u.mean(), v - v.mean()
    assert math.isnan(got[0].item())
    assert got[1].item() == pytest.approx(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))


def test_a_metric_keeps_its_own_default_k_unless_compare_is_given_one():
    # The mass of b on a's top k pixels, k = 3 by its own default: compare's k only
    # where given (before, compare passed k=None and the metric failed on it).
    @register_metric("top_mass")
    def top_mass(a: torch.Tensor, b: torch.Tensor, k: int = 3) -> torch.Tensor:
        order = a.flatten(1).argsort(1, descending=True)[:, :k]
        return b.flatten(1).gather(1, order).sum(1)

    a = torch.arange(16.0).view(1, 4, 4)
    b = torch.ones(1, 4, 4)
    try:
        assert compare(a, b)["top_mass"].tolist() == [3.0]
        assert compare(a, b, k=5)["top_mass"].tolist() == [5.0]
    finally:
        del METRICS["top_mass"]


def test_medians_of_flags_are_the_fraction_true_and_skip_non_finite_numbers():
    rows = [
        {"kept": True, "pcc": float("nan")},
        {"kept": True, "pcc": 0.2},
        {"kept": False, "pcc": 0.4},
        {"kept": True, "pcc": float("inf")},
    ]
    out = medians(rows, ["kept", "pcc", "none"])
    assert out["kept"] == pytest.approx(3 / 4)  # np.mean of the flags; their median is 1
    assert out["pcc"] == pytest.approx(float(np.median([0.2, 0.4])))
    assert out["none"] is None


def test_medians_of_integer_counts_are_medians_not_fractions():
    # Only booleans are flags: an int field (a count of steps, of pixels) is a number.
    rows = [{"steps": 1, "kept": True}, {"steps": 2, "kept": False}, {"steps": 10, "kept": True}]
    out = medians(rows, ["steps", "kept"])
    assert out["steps"] == float(np.median([1, 2, 10])) == 2.0
    assert out["kept"] == pytest.approx(2 / 3)


def test_maps_of_mixed_precision_are_compared_in_the_wider_dtype():
    # float32 against float64: every score is the float64 one of the float32
    # map's exact values, not a float32 rounding of it.
    a, b = _pairs((16, 16))
    a32 = a.float()
    mixed, wide = compare(a32, b), compare(a32.double(), b)
    for name in wide:
        assert mixed[name].dtype == torch.float64, name
        torch.testing.assert_close(mixed[name], wide[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_scores_of_float32_and_half_maps_are_float32(dtype):
    # compare's contract: maps of fewer than 32 bits are compared in float32, and every
    # score, the rank statistics (spearman, topk) included, comes back in that dtype.
    a, b = (m.to(dtype) for m in _pairs((16, 16)))
    out = compare(a, b, k=7)
    for name, value in out.items():
        assert value.dtype == torch.float32, name
    ref = stats.spearmanr(a[0].double().numpy().ravel(), b[0].double().numpy().ravel())
    assert out["spearman"][0].item() == pytest.approx(ref.statistic, abs=1e-6)


def test_group_records_puts_missing_values_first():
    rows = [{"beta": 2.0}, {"method": "x"}, {"beta": 1.0}]
    assert list(group_records(rows, ["beta"])) == [(None,), (1.0,), (2.0,)]


def test_group_records_puts_numbers_before_names():
    # The documented order: missing values, then numbers (by value), then names.
    rows = [{"beta": "relu"}, {"beta": 10.0}, {}, {"beta": "beta=2"}, {"beta": 2}]
    assert list(group_records(rows, ["beta"])) == [
        (None,),
        (2,),
        (10.0,),
        ("beta=2",),
        ("relu",),
    ]


def test_group_records_reads_a_name_s_exponent_as_part_of_its_number():
    # beta=5e-01 is 0.5: before beta=1, not after beta=2 as a 5 followed by "e-01" would sort.
    rows = [{"method": m} for m in ("beta=2", "beta=5e-01", "beta=1", "beta=1.5E+00")]
    assert [g[0] for g in group_records(rows, ["method"])] == [
        "beta=5e-01",
        "beta=1",
        "beta=1.5E+00",
        "beta=2",
    ]


def test_group_records_sorts_flags_as_names_after_the_numbers():
    # A flag is not a number: False and True come after every number, by name.
    rows = [{"k": True}, {"k": 0.5}, {"k": False}, {"k": 3}]
    assert list(group_records(rows, ["k"])) == [(0.5,), (3,), (False,), (True,)]


def test_compare_gives_a_registered_metric_half_maps_in_float32():
    # The documented promotion holds for every metric, not only the built-in ones.
    seen = []
    register_metric("dtype_seen")(lambda a, b: seen.append((a.dtype, b.dtype)) or mse(a, b))
    try:
        a, b = torch.rand(2, 4, 4, dtype=torch.float16), torch.rand(2, 4, 4, dtype=torch.float16)
        scores = compare(a, b)
    finally:
        del METRICS["dtype_seen"]
    assert seen == [(torch.float32, torch.float32)]
    assert scores["dtype_seen"].dtype == torch.float32


def test_group_records_reads_a_name_s_decimals_as_part_of_its_number():
    # beta=0.25 < beta=0.5 < beta=0.75 by value; digits after the point read as
    # a number of their own would put 0.5 before 0.25 (5 < 25).
    rows = [{"method": m} for m in ("beta=0.5", "beta=0.75", "beta=0.25")]
    assert [g[0] for g in group_records(rows, ["method"])] == [
        "beta=0.25",
        "beta=0.5",
        "beta=0.75",
    ]
