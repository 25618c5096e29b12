"""Figures of a run: explanation grids, defense curves and the theorem plots.

Every function takes plain data (numpy arrays, dicts, lists) and an output
path, draws with matplotlib's Agg canvas (no pyplot state, no display) and
returns the path of the PNG it wrote. Figures have a fixed size in pixels
(no tight bounding box), and the PNGs carry no software or date metadata, so
that drawing the same data twice gives byte-identical files.

Explanation maps are drawn with ``magma``: it is perceptually uniform (equal
steps in relevance look like equal steps in colour), its lightness grows
monotonically from black to near white (so the map still reads in grey scale
and for colour-blind readers), and it does not invent edges as ``jet`` does.
All maps of one grid row share one colour scale.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.lines
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .store import write_bytes

__all__ = [
    "DEFENSE_STYLES",
    "DPI",
    "MAP_CMAP",
    "cost_quality",
    "curvature_figure",
    "defense_curves",
    "defense_grid",
    "defense_style",
    "density_figure",
    "explain_grid",
    "grid_size",
    "iid_bias_figure",
    "mc_error_figure",
    "method_grid",
    "smoothgrad_pcc_figure",
    "softplus_figure",
    "theorem_figures",
]

DPI = 100
MAP_CMAP = "magma"
# Inches per grid cell, and the strips for the column titles and colour bar.
CELL = 1.35
TITLE_H = 0.3
CBAR_W = 0.55
FOOT_H = 0.1
PLOT_SIZE = (5.6, 3.8)
# Maps are drawn up to this quantile of the row, so that one hot pixel does not
# turn the rest of the row black; every map in the row uses the same limit.
MAP_QUANTILE = 99.5

_STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.6,
    "image.interpolation": "nearest",
    # Labels carry user text (class folders, method names): "$" is a dollar.
    "text.parse_math": False,
}
_PNG_METADATA = {"Software": None}


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata=_PNG_METADATA)
    write_bytes(path, buffer.getvalue())
    return path


@contextlib.contextmanager
def _line_plot(
    path: str | Path, xlabel: str, ylabel: str, title: str, legend: str = "best"
) -> Iterator[Axes]:
    # One frame for every line plot: the body draws, the frame labels and saves.
    with matplotlib.rc_context(_STYLE):
        fig = _figure(PLOT_SIZE)
        ax = fig.add_axes([0.12, 0.13, 0.84, 0.77])
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(loc=legend)
        ax.set_title(title, loc="left")
        _save(fig, path)


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a grid of ``rows`` x ``cols`` panels.

    Parameters
    ----------
    rows, cols : int
        Number of image rows and of panels per row.

    Returns
    -------
    tuple of int
        Width and height in pixels of the PNG that :func:`method_grid` or
        :func:`explain_grid` writes.

    Examples
    --------
    >>> grid_size(2, 5)
    (730, 310)
    """
    width = CELL * cols + CBAR_W
    height = CELL * rows + TITLE_H + FOOT_H
    return round(width * DPI), round(height * DPI)


def _image(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) RGB in [0, 1], scaled by the row's range ``[lo, hi]``."""
    x = (np.asarray(x, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
    x = np.clip(x, 0.0, 1.0)
    if x.shape[0] == 3:
        return np.transpose(x, (1, 2, 0))
    grey = x[0] if x.shape[0] == 1 else x.mean(0)
    return np.repeat(grey[..., None], 3, axis=-1)


def _display_range(values: np.ndarray) -> tuple[float, float]:
    """Pixels in [0, 1] as they are (a dark photo stays dark); other ranges stretched to fit."""
    lo, hi = float(values.min()), float(values.max())
    slack = 1e-3  # float rounding of de-normalised pixels
    return (0.0, 1.0) if lo >= -slack and hi <= 1.0 + slack else (lo, hi)


def _fit(panel: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W, 3) panel into a (size, size, 3) cell, pixels
    kept as pixels and the aspect ratio as it is: a wide image gets white bars above and
    below, as a tall one left and right."""
    height, width = panel.shape[:2]
    h = max(1, round(size * height / max(height, width)))
    w = max(1, round(size * width / max(height, width)))
    cell = np.ones((size, size, panel.shape[2]))
    top, left = (size - h) // 2, (size - w) // 2
    cell[top : top + h, left : left + w] = panel[np.arange(h) * height // h][
        :, np.arange(w) * width // w
    ]
    return cell


def _draw_grid(
    columns: Sequence[tuple[str, str, np.ndarray]],
    path: str | Path,
    row_labels: Sequence[str] | None,
) -> Path:
    """Draw ``columns`` of (title, kind, stack); kind is "image" or "map".

    The panels are composed into one RGB array drawn pixel for pixel by a
    single axes: dozens of separate axes would make drawing ten times slower.
    """
    rows, cols = len(columns[0][2]), len(columns)
    width, height = grid_size(rows, cols)
    canvas, vmax = _compose(columns)
    maps = [c[2] for c in columns if c[1] == "map"]
    with matplotlib.rc_context(_STYLE):
        # Inches a hair over the pixels: matplotlib before 3.11 truncates
        # 4.6 * 100 = 459.99999999999994 to 459 pixels.
        fig = _figure(((width + 1e-6) / DPI, (height + 1e-6) / DPI))
        grid_w, grid_h = cols * _CELL_PX / width, rows * _CELL_PX / height
        foot = FOOT_H * DPI / height
        ax = fig.add_axes([0.0, foot, grid_w, grid_h])
        ax.imshow(canvas, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        title_y = foot + grid_h + 0.08 * TITLE_H * DPI / height
        for c, (name, _, _) in enumerate(columns):
            fig.text(
                (c + 0.5) * _CELL_PX / width, title_y, name, ha="center", va="bottom", fontsize=8
            )
        for r in range(rows):
            y1 = 1.0 - (TITLE_H * DPI + r * _CELL_PX + _GAP_PX) / height
            if row_labels is not None:
                _row_label(fig, row_labels[r], (_GAP_PX + 2) / width, y1)
            if maps:
                pixels = np.asarray(maps[0][0]).size
                _colour_bar(fig, (grid_w, y1), (width, height), vmax[r] * pixels)
        if maps:
            x_unit = grid_w + 0.05 * CBAR_W * DPI / width
            fig.text(x_unit, title_y, "× 1/(HW)", ha="left", va="bottom", fontsize=6)
        return _save(fig, path)


_CELL_PX = round(CELL * DPI)
_GAP_PX = 4


def _compose(columns: Sequence[tuple[str, str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The grid's panels as one RGB canvas, and the colour-scale top of each row's maps."""
    rows, cols = len(columns[0][2]), len(columns)
    inner = _CELL_PX - _GAP_PX
    canvas = np.ones((rows * _CELL_PX, cols * _CELL_PX, 3))
    cmap = matplotlib.colormaps[MAP_CMAP]
    images = [c[2] for c in columns if c[1] == "image"]
    maps = [c[2] for c in columns if c[1] == "map"]
    vmax = np.ones(rows)
    for r in range(rows):
        if images:
            lo, hi = _display_range(np.concatenate([np.ravel(s[r]) for s in images]))
        if maps:
            values = np.concatenate([np.ravel(s[r]) for s in maps])
            top = float(np.percentile(values, MAP_QUANTILE))
            # A map on fewer pixels than the quantile leaves out has a top of 0:
            # then its largest value, so that those pixels show.
            top = top if top > 0 else float(values.max())
            vmax[r] = top if top > 0 else 1.0
        for c, (_, kind, stack) in enumerate(columns):
            if kind == "image":
                panel = _image(stack[r], lo, hi)
            else:
                panel = cmap(np.clip(np.asarray(stack[r], dtype=np.float64) / vmax[r], 0, 1))
                panel = panel[..., :3]
            y, x = r * _CELL_PX + _GAP_PX // 2, c * _CELL_PX + _GAP_PX // 2
            canvas[y : y + inner, x : x + inner] = _fit(panel, inner)
    return canvas, vmax


def _row_label(fig: object, text: str, x: float, y: float) -> None:
    box = {"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0}
    fig.text(x, y, text, va="top", ha="left", fontsize=7, color="white", bbox=box)


def _colour_bar(fig: object, at: tuple[float, float], size: tuple[int, int], top: float) -> None:
    """A row's colour bar right of the grid, from 0 to ``top``."""
    (grid_w, y1), (width, height) = at, size
    inner = _CELL_PX - _GAP_PX
    cax = fig.add_axes(
        [grid_w + 0.1 * CBAR_W * DPI / width, y1 - inner / height, 0.12 * CBAR_W * DPI / width,
         inner / height]
    )  # fmt: skip
    # Labelled in multiples of the uniform share 1 / (H W): small plain
    # numbers, comparable across image sizes, and no exponent text to collide.
    cmap = matplotlib.colormaps[MAP_CMAP]
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, top), cmap)
    bar = fig.colorbar(mappable, cax=cax)
    bar.ax.tick_params(labelsize=6, length=2, pad=1)


def method_grid(
    x: np.ndarray,
    map_orig: np.ndarray,
    x_adv: np.ndarray,
    map_adv: np.ndarray,
    map_target: np.ndarray | None,
    path: str | Path,
    *,
    maps_beta: np.ndarray | None = None,
    betas: Sequence[float] | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Grid of an attack: one row per image.

    Columns: original image, its map, attacked image, its map, target map
    (unless ``None``: an untargeted attack has none), then one beta-smoothed
    map of the attacked image per beta when given.
    Maps are drawn with :data:`MAP_CMAP` on one colour scale per row (from 0
    to the row's 99.5th percentile, shown by the colour bar); the two images
    of a row share one grey scale, so the attack's change is not exaggerated.
    The colour bar counts in multiples of the uniform share ``1 / (H W)`` of a
    map that sums to 1.

    Parameters
    ----------
    x, x_adv : numpy.ndarray
        Original and attacked inputs, ``(B, C, H, W)``.
    map_orig, map_adv : numpy.ndarray
        Maps ``(B, H, W)``.
    map_target : numpy.ndarray or None
        Target maps ``(B, H, W)``, or ``None`` to leave their column out.
    path : str or Path
        Where to write the PNG.
    maps_beta : numpy.ndarray, optional
        Beta-smoothed maps of the attacked inputs, ``(B, len(betas), H, W)``.
    betas : sequence of float, optional
        The betas of ``maps_beta``.
    row_labels : sequence of str, optional
        A short label per row (e.g. index and labels), drawn on the first image.

    Returns
    -------
    Path
        The PNG written, of pixel size ``grid_size(B, 5 + len(betas))`` (one
        column less without ``map_target``).

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> x, m = rng.random((2, 1, 8, 8)), rng.random((2, 8, 8))
    >>> method_grid(x, m, x, m, m, tmp / "grid.png").name
    'grid.png'
    """
    columns = [
        ("original", "image", np.asarray(x)),
        ("original map", "map", np.asarray(map_orig)),
        ("attacked", "image", np.asarray(x_adv)),
        ("attacked map", "map", np.asarray(map_adv)),
    ]
    if map_target is not None:
        columns.append(("target map", "map", np.asarray(map_target)))
    if maps_beta is not None and betas is not None:
        maps_beta = np.asarray(maps_beta)
        for k, beta in enumerate(betas):
            columns.append((f"attacked, β={beta:g}", "map", maps_beta[:, k]))
    return _draw_grid(columns, path, row_labels)


def defense_grid(
    map_orig: np.ndarray,
    map_adv: np.ndarray,
    map_target: np.ndarray | None,
    maps: np.ndarray,
    betas: Sequence[float],
    path: str | Path,
    *,
    label: str,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Grid of one defense's maps of the attacked images: one row per image.

    Columns: the undefended maps of the original and the attacked image, the
    target map (unless ``None``), then the defended map of the attacked image
    per beta, titled ``"<label>, β=<beta>"``. Drawn as :func:`method_grid`
    draws its maps, one colour scale per row, so that a defense's columns
    compare with the undefended maps beside them.

    Parameters
    ----------
    map_orig, map_adv : numpy.ndarray
        Undefended maps of the original and the attacked inputs, ``(B, H, W)``.
    map_target : numpy.ndarray or None
        Target maps ``(B, H, W)``, or ``None`` to leave their column out.
    maps : numpy.ndarray
        The defense's maps of the attacked inputs, ``(B, len(betas), H, W)``.
    betas : sequence of float
        The betas of ``maps``.
    path : str or Path
        Where to write the PNG.
    label : str
        The defense's name in the column titles (:func:`defense_style`).
    row_labels : sequence of str, optional
        A short label per row, drawn on the first map.

    Returns
    -------
    Path
        The PNG written, of pixel size ``grid_size(B, 3 + len(betas))`` (one
        column less without ``map_target``).

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> m = np.random.default_rng(0).random((2, 3, 8, 8))
    >>> path = defense_grid(m[:, 0], m[:, 0], None, m[:, 1:], [1, 10], tmp / "sg.png", label="SG")
    >>> path.name
    'sg.png'
    """
    maps = np.asarray(maps)
    if maps.ndim != 4 or maps.shape[1] != len(betas):
        raise ValueError(
            f"maps must be (B, len(betas), H, W) = (B, {len(betas)}, H, W); got {maps.shape}"
        )
    columns = [
        ("original map", "map", np.asarray(map_orig)),
        ("attacked map", "map", np.asarray(map_adv)),
    ]
    if map_target is not None:
        columns.append(("target map", "map", np.asarray(map_target)))
    columns += [(f"{label}, β={beta:g}", "map", maps[:, k]) for k, beta in enumerate(betas)]
    return _draw_grid(columns, path, row_labels)


def explain_grid(
    x: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Grid of explanations: one row per image, the image then one map per method.

    Parameters
    ----------
    x : numpy.ndarray
        Inputs ``(B, C, H, W)``.
    maps : mapping of str to numpy.ndarray
        Method name -> maps ``(B, H, W)``; all maps of a row share one scale.
    path : str or Path
        Where to write the PNG.
    row_labels : sequence of str, optional
        A short label per row.

    Returns
    -------
    Path
        The PNG written, of pixel size ``grid_size(B, 1 + len(maps))``.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> maps = {"gradient": rng.random((2, 8, 8))}
    >>> explain_grid(rng.random((2, 1, 8, 8)), maps, tmp / "e.png").name
    'e.png'
    """
    columns = [("image", "image", np.asarray(x))]
    columns += [(name, "map", np.asarray(m)) for name, m in maps.items()]
    return _draw_grid(columns, path, row_labels)


class _PlainLogFormatter(matplotlib.ticker.LogFormatter):
    """Log-axis labels as plain numbers (0.5, 10, 1e-05).

    Matplotlib's default log labels are mathtext (``$10^{-1}$``), which the
    figures' style leaves unparsed so that user text may hold dollars; this
    formatter keeps the default's choice of which ticks to label.
    """

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _log_scale(ax: Axes, which: str = "x", ticks: np.ndarray | None = None) -> None:
    """Put the ``which`` axis of ``ax`` on a log scale with plain-number labels.

    With ``ticks``, the ticks are those values, each labelled (a log formatter
    labels only the powers of ten of an axis across decades).
    """
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    if ticks is None:
        axis.set_major_formatter(_PlainLogFormatter())
        axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
        return
    axis.set_ticks(ticks)
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _log_axis(ax: object, values: np.ndarray) -> None:
    if values.size and np.all(values > 0) and values.max() / values.min() >= 10:
        ticks = np.unique(values)
        _log_scale(ax, "x", ticks if ticks.size <= 8 else None)


DEFENSE_SIZE = (9.0, 4.3)

#: How the figures draw each defense: legend label, colour (where colour tells the
#: defense), marker, line style. Another defense is drawn in turn as :func:`defense_style`.
DEFENSE_STYLES: dict[str, tuple[str, str, str, object]] = {
    "beta_smooth": ("β-smoothing", "C0", "o", "-"),
    "smoothgrad": ("SmoothGrad", "C1", "s", ":"),
}
_OTHER_STYLES = (("^", "-."), ("D", "--"), ("v", (0, (5, 1, 1, 1))), ("P", (0, (1, 1))))


def defense_style(defense: str, others: Sequence[str] = ()) -> tuple[str, str, str, object]:
    """Legend label, colour, marker and line style of ``defense`` in the figures.

    A defense outside :data:`DEFENSE_STYLES` is labelled with its name and
    takes the next of a few styles by its place in ``others``.

    Examples
    --------
    >>> defense_style("smoothgrad")
    ('SmoothGrad', 'C1', 's', ':')
    >>> defense_style("median_filter", ["median_filter"])
    ('median_filter', 'C4', '^', '-.')
    """
    if defense in DEFENSE_STYLES:
        return DEFENSE_STYLES[defense]
    k = list(others).index(defense) if defense in others else 0
    marker, line = _OTHER_STYLES[k % len(_OTHER_STYLES)]
    return defense, f"C{4 + k % 6}", marker, line


def defense_curves(
    betas: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    smoothgrad_betas: Sequence[float] | None = None,
    smoothgrad: Mapping[str, Sequence[float]] | None = None,
    others: Mapping[str, tuple[Sequence[float], Mapping[str, Sequence[float]]]] | None = None,
    undefended: Mapping[str, float] | None = None,
    undefended_label: str = "no defense (ReLU)",
    title: str | None = None,
) -> Path:
    """Defense curves against beta: similarity of the defended maps, PCC and SSIM.

    Colour tells the comparison (attacked map vs original, vs target, clean
    map vs target, vs original), line style the defense: solid for beta-smoothing,
    dotted for SmoothGrad at the matched noise level, another style for each
    other defense (:func:`defense_style`), faint dotted horizontal lines in
    each comparison's colour for no defense.

    Parameters
    ----------
    betas : sequence of float
        The betas of the sweep (x axis, log scale when it spans a decade).
    curves : mapping of str to sequence of float
        Sweep keys (``adv_vs_orig_pcc``, ``adv_vs_target_pcc``,
        ``clean_vs_target_pcc``, ``clean_vs_orig_pcc``, and the ``_ssim``
        variants) -> median per beta.
        The PCC keys are drawn on the left panel, the SSIM keys on the right.
    path : str or Path
        Where to write the PNG.
    smoothgrad_betas : sequence of float, optional
        The beta each SmoothGrad setting is matched to (its noise has the
        variance of p_beta).
    smoothgrad : mapping of str to sequence of float, optional
        The same keys for SmoothGrad, one median per ``smoothgrad_betas``.
    others : mapping, optional
        Another defense's name -> its betas and its curves (the same keys).
    undefended : mapping of str to float, optional
        The same keys for the ReLU network without defense, drawn as faint
        horizontal lines (e.g. ``adv_vs_orig_pcc`` = median ``expl_pcc_orig``).
    undefended_label : str
        Legend entry of those lines: what they measure (for an adaptive attack
        on a defense, the defended map the attack moved).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written, of ``DEFENSE_SIZE`` inches at ``DPI``.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> curves = {"adv_vs_orig_pcc": [0.2, 0.8], "adv_vs_target_pcc": [0.9, 0.3]}
    >>> defense_curves([10.0, 1.0], curves, tmp / "defense.png").name
    'defense.png'
    """
    betas = np.asarray(betas, dtype=np.float64)
    sg_betas = np.asarray(smoothgrad_betas if smoothgrad_betas is not None else [], float)
    others = dict(others or {})
    series = [
        ("beta_smooth", betas, curves),
        ("smoothgrad", sg_betas, smoothgrad or {}),
        *((name, np.asarray(b, dtype=np.float64), c) for name, (b, c) in others.items()),
    ]
    with matplotlib.rc_context(_STYLE):
        fig = _figure(DEFENSE_SIZE)
        axes = fig.subplots(
            1,
            2,
            gridspec_kw={"wspace": 0.22, "left": 0.07, "right": 0.98, "bottom": 0.3},
        )
        used: set[str] = set()
        for ax, metric in zip(axes, ("pcc", "ssim")):
            used |= _defense_panel(ax, metric, series, undefended or {}, list(others))
            _log_axis(ax, np.concatenate([x for _, x, _ in series]))
            ax.set_xlabel("β")
            ax.set_ylabel(metric.upper())
            ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.02)
        axes[0].set_title("PCC of maps", loc="left")
        axes[1].set_title("SSIM of maps", loc="left")
        # Two rows, colours (the comparisons) above line styles (the defenses):
        # seven entries in one row run off a figure of this width.
        for row, handles in enumerate(_defense_legend(used, undefended_label, list(others))):
            if handles:
                where = (0.5, 0.06 - 0.06 * row)
                fig.legend(
                    handles=handles,
                    loc="lower center",
                    bbox_to_anchor=where,
                    ncol=len(handles),
                    frameon=False,
                )
        if title:
            fig.suptitle(title, x=0.01, ha="left", fontsize=10)
            fig.subplots_adjust(top=0.86)
        return _save(fig, path)


#: The comparisons of a defense sweep: key stem -> (legend label, colour).
_COMPARISONS = {
    "adv_vs_orig": ("attacked vs original", "C0"),
    "adv_vs_target": ("attacked vs target", "C3"),
    # The attacked map's distance above this one is what the attack moved.
    "clean_vs_target": ("clean vs target", "C1"),
    "clean_vs_orig": ("clean vs original", "C2"),
}


def _defense_panel(
    ax: object,
    metric: str,
    series: Sequence[tuple],
    undefended: Mapping[str, float],
    others: Sequence[str],
) -> set[str]:
    """One metric's curves per comparison and defense; returns what was drawn, for the legend."""
    used = set()
    for stem, (_, colour) in _COMPARISONS.items():
        key = f"{stem}_{metric}"
        for name, x, values in series:
            _, _, marker, style = defense_style(name, others)
            if key in values and x.size:
                order = np.argsort(x)
                y = np.asarray(values[key], dtype=np.float64)[order]
                ax.plot(x[order], y, style, color=colour, marker=marker, ms=3)
                used |= {stem, name}
        if key in undefended:
            ax.axhline(undefended[key], color=colour, alpha=0.5, ls=(0, (1, 3)), lw=1.2)
            used |= {"none"}
    return used


def _defense_legend(
    used: set[str], undefended_label: str, others: Sequence[str]
) -> tuple[list, list]:
    """The legend's entries: the comparisons' colours, and the defenses' line styles."""
    colours = [
        matplotlib.lines.Line2D([], [], color=colour, lw=3, label=label)
        for stem, (label, colour) in _COMPARISONS.items()
        if stem in used
    ]
    styles = []
    for name in [*DEFENSE_STYLES, *others]:
        if name in used:
            label, _, marker, line = defense_style(name, others)
            styles.append(
                matplotlib.lines.Line2D([], [], color="0.3", ls=line, marker=marker, label=label)
            )
    if "none" in used:
        styles.append(
            matplotlib.lines.Line2D([], [], color="0.3", ls=(0, (1, 3)), label=undefended_label)
        )
    return colours, styles


def cost_quality(
    points: Sequence[Mapping[str, object]],
    path: str | Path,
    *,
    metric: str = "adv_vs_orig_pcc",
    title: str | None = None,
) -> Path:
    """SmoothGrad against beta-smoothing: quality of the defended map against time.

    Parameters
    ----------
    points : sequence of mapping
        One per setting, with keys ``defense`` (``"beta_smooth"``,
        ``"smoothgrad"`` or another, drawn as :func:`defense_style`),
        ``label`` (e.g. ``"β=1"``), ``seconds`` (median
        seconds per image) and ``metric`` (median quality).
    path : str or Path
        Where to write the PNG.
    metric : str
        The name of the quality measure, for the y label.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> pts = [{"defense": "beta_smooth", "label": "β=1", "seconds": 0.01, "metric": 0.8},
    ...        {"defense": "smoothgrad", "label": "σ=0.1", "seconds": 0.3, "metric": 0.7}]
    >>> cost_quality(pts, tmp / "cost.png").name
    'cost.png'
    """
    others = [
        d for d in dict.fromkeys(str(p["defense"]) for p in points) if d not in DEFENSE_STYLES
    ]
    with matplotlib.rc_context(_STYLE):
        fig = _figure(PLOT_SIZE)
        ax = fig.add_axes([0.13, 0.14, 0.83, 0.74])
        seconds = np.array([float(p["seconds"]) for p in points])
        # SmoothGrad costs N passes: the spread is usually a decade or more.
        log = bool(seconds.size and np.all(seconds > 0) and seconds.max() / seconds.min() >= 10)
        where = np.array(
            [[np.log10(s) if log else s, float(p["metric"])] for s, p in zip(seconds, points)]
        ).reshape(-1, 2)
        span = np.ptp(where, axis=0) if len(where) else np.ones(2)
        span = np.where(span > 0, span, 1.0)
        for defense in [*DEFENSE_STYLES, *others]:
            label, colour, marker, _ = defense_style(defense, others)
            mine = [i for i, p in enumerate(points) if p["defense"] == defense]
            pts = [points[i] for i in mine]
            if not pts:
                continue
            xs = np.array([float(p["seconds"]) for p in pts])
            ys = np.array([float(p["metric"]) for p in pts])
            ax.plot(xs, ys, marker, color=colour, ms=6, label=label)
            # β-smoothing labels to the left, SmoothGrad to the right: equal betas of the
            # two often land close together.
            left = defense == "beta_smooth"
            for text, x, y in _joined_labels(pts, where[mine], span):
                ax.annotate(
                    text,
                    (x, y),
                    textcoords="offset points",
                    xytext=(-5 if left else 5, 3),
                    ha="right" if left else "left",
                    fontsize=7,
                    color=colour,
                )
        if log:
            _log_scale(ax, "x")
        ax.margins(x=0.25, y=0.12)
        ax.set_xlabel("median seconds per image (its attacked and clean maps)")
        ax.set_ylabel(f"median {metric}")
        ax.legend(loc="best")
        ax.set_title(title or "Quality against cost", loc="left")
        return _save(fig, path)


#: Points of one defense closer than these shares of the plot's spans (x, y) share
#: one label: a 7-point label is about a tenth of the plot wide, a twentieth high.
CLOSE = (0.1, 0.06)


def _joined_labels(
    pts: Sequence[Mapping[str, object]], where: np.ndarray, span: np.ndarray
) -> list[tuple[str, float, float]]:
    """The labels of ``pts`` (plot positions ``where``), those of nearby points joined.

    Two points of one defense at almost the same cost and quality (beta 20 and
    50 often are) would print their labels on top of each other; they get one
    label, ``"β=20, β=50"``, at the first of them.
    """
    groups: list[tuple[list[str], np.ndarray, tuple[float, float]]] = []
    for p, at in zip(pts, where / span):
        near = next((g for g in groups if np.all(np.abs(g[1] - at) < np.array(CLOSE))), None)
        if near is None:
            groups.append(([str(p["label"])], at, (float(p["seconds"]), float(p["metric"]))))
        else:
            near[0].append(str(p["label"]))
    return [(", ".join(names), x, y) for names, _, (x, y) in groups]


def softplus_figure(curve: Mapping[str, object], path: str | Path) -> Path:
    """softplus_beta against ReLU, one curve per beta.

    Parameters
    ----------
    curve : mapping
        ``x`` (grid), ``betas``, ``y`` (one list per beta) and ``relu``.
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> x = np.linspace(-2, 2, 5)
    >>> c = {"x": x, "betas": [1.0], "y": [np.log1p(np.exp(x))], "relu": np.maximum(x, 0)}
    >>> softplus_figure(c, tmp / "softplus.png").name
    'softplus.png'
    """
    x = np.asarray(curve["x"], dtype=np.float64)
    betas = list(curve["betas"])
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, max(len(betas), 1)))
    ylabel = "softplus_β(x) = log(1 + exp(βx)) / β"
    with _line_plot(path, "x", ylabel, "softplus_β tends to ReLU as β grows", "upper left") as ax:
        for beta, y, colour in zip(betas, curve["y"], colours):
            ax.plot(x, np.asarray(y, dtype=np.float64), color=colour, label=f"β={float(beta):g}")
        ax.plot(x, np.asarray(curve["relu"], dtype=np.float64), "k--", lw=1.2, label="ReLU")
    return Path(path)


def density_figure(curve: Mapping[str, object], path: str | Path) -> Path:
    """The logistic density p_beta against the normal density of the same variance.

    Parameters
    ----------
    curve : mapping
        ``x``, ``logistic``, ``normal`` and ``beta``.
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> x = np.linspace(-3, 3, 7)
    >>> c = {"x": x, "logistic": np.exp(-x**2), "normal": np.exp(-x**2), "beta": 1.0}
    >>> density_figure(c, tmp / "density.png").name
    'density.png'
    """
    x = np.asarray(curve["x"], dtype=np.float64)
    beta = float(curve["beta"])
    title = "Logistic noise has heavier tails than normal noise"
    with _line_plot(path, "ε", "density", title, "upper right") as ax:
        ax.plot(x, np.asarray(curve["logistic"], dtype=np.float64), "C0", label=f"p_β, β={beta:g}")
        normal = np.asarray(curve["normal"], dtype=np.float64)
        ax.plot(x, normal, "C1--", label="normal, same variance π²/(3β²)")
    return Path(path)


def mc_error_figure(curve: Mapping[str, object], path: str | Path) -> Path:
    """Monte Carlo error of Theorem 2 against the number of samples, log-log.

    Parameters
    ----------
    curve : mapping
        ``n`` (sample counts), ``projected`` and ``iid`` (error of the
        estimate per n), ``projected_ci`` (per n either the half-width of the
        confidence interval, drawn as a band from below up to it, or a
        ``(low, high)`` pair) and ``iid_bias`` (the exact bias of the iid noise
        model, drawn as a horizontal line).
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> n = np.array([10, 100, 1000])
    >>> c = {"n": n, "projected": 1 / np.sqrt(n), "projected_ci": 2 / np.sqrt(n),
    ...      "iid": 1 / np.sqrt(n) + 0.01, "iid_bias": 0.01}
    >>> mc_error_figure(c, tmp / "mc.png").name
    'mc.png'
    """
    n = np.asarray(curve["n"], dtype=np.float64)
    projected = np.asarray(curve["projected"], dtype=np.float64)
    iid = np.asarray(curve["iid"], dtype=np.float64)
    positive = np.concatenate([projected[projected > 0], iid[iid > 0]])
    # Zero errors cannot be drawn on a log axis: they sit a decade below the rest.
    floor = float(positive.min()) / 10 if positive.size else 1e-6
    title = "Theorem 2: error falls as 1/√N only with projected noise"
    with _line_plot(
        path, "Monte Carlo samples N", "max error of E[∇g(x − ε)]", title, "lower left"
    ) as ax:
        ci = curve.get("projected_ci")
        if ci is not None:
            ci = np.asarray(ci, dtype=np.float64)
            if ci.ndim == 2:
                low, high = np.maximum(ci[:, 0], floor), ci[:, 1]
            else:
                low, high = np.full_like(n, floor), ci
            ax.fill_between(n, low, high, color="C0", alpha=0.18, lw=0, label="95% CI (projected)")
        ax.plot(n, np.maximum(projected, floor), "C0o-", ms=3, label="projected noise (exact)")
        ax.plot(n, np.maximum(iid, floor), "C3s-", ms=3, label="iid noise")
        bias = curve.get("iid_bias")
        if bias is not None and float(bias) > 0:
            ax.axhline(float(bias), color="C3", ls=":", lw=1.2, label=f"iid bias {float(bias):.3g}")
        _log_scale(ax, "x")
        _log_scale(ax, "y")
    return Path(path)


def iid_bias_figure(curve: Mapping[str, object], path: str | Path) -> Path:
    """Bias of Theorem 2 under iid logistic noise against the dimension d.

    Parameters
    ----------
    curve : mapping
        ``d`` (dimensions), ``bias`` (the exact bias for ``w = (1, ..., 1)``
        in R^d) and ``limit`` (its limit as d grows, drawn as a line).
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> c = {"d": [1, 4, 64], "bias": [0.0, 0.015, 0.022], "limit": 0.0228}
    >>> iid_bias_figure(c, tmp / "bias.png").name
    'bias.png'
    """
    d = np.asarray(curve["d"], dtype=np.float64)
    xlabel = "dimension d (w = (1, …, 1))"
    ylabel = "sup |P(u·ε < t) − sigmoid(βt)|"
    title = "iid noise: Theorem 2 is off by this much"
    with _line_plot(path, xlabel, ylabel, title, "lower right") as ax:
        ax.plot(d, np.asarray(curve["bias"], dtype=np.float64), "C3o-", ms=3, label="iid bias")
        if curve.get("limit") is not None:
            limit = float(curve["limit"])
            ax.axhline(limit, color="0.3", ls="--", lw=1.2, label=f"limit d → ∞: {limit:.4f}")
        _log_scale(ax, "x")
    return Path(path)


def smoothgrad_pcc_figure(curve: Mapping[str, object], path: str | Path) -> Path:
    """PCC of beta-smoothed gradients with SmoothGrad (logistic and Gaussian noise) against beta.

    Parameters
    ----------
    curve : mapping
        ``beta``, ``logistic`` and ``gaussian`` (PCC per beta).
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> c = {"beta": [1, 10], "logistic": [0.9, 0.95], "gaussian": [0.85, 0.9]}
    >>> smoothgrad_pcc_figure(c, tmp / "pcc.png").name
    'pcc.png'
    """
    series = (
        ("logistic", "C0o-", "SmoothGrad, logistic noise (scale 1/β)"),
        ("gaussian", "C1s--", "SmoothGrad, Gaussian noise (same variance)"),
    )
    title = "β-smoothing against SmoothGrad on a deep network"
    return _against_beta(curve, series, path, "PCC with the β-smoothed gradient", title)


def curvature_figure(curve: Mapping[str, object], path: str | Path) -> Path:
    """Curvature of the beta-smoothed network against beta (log-log where positive).

    Parameters
    ----------
    curve : mapping
        ``beta``, ``hessian_norm`` and ``principal_curvature`` (per beta).
    path : str or Path
        Where to write the PNG.

    Returns
    -------
    Path
        The PNG written.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> c = {"beta": [1, 10], "hessian_norm": [0.5, 5.0], "principal_curvature": [0.1, 1.0]}
    >>> curvature_figure(c, tmp / "curv.png").name
    'curv.png'
    """
    series = (
        ("hessian_norm", "C0o-", "Hessian spectral norm"),
        ("principal_curvature", "C3s--", "largest principal curvature"),
    )
    title = "Curvature grows with β (ReLU: β → ∞)"
    return _against_beta(curve, series, path, "median over images", title, log_y=True)


def _against_beta(
    curve: Mapping[str, object],
    series: tuple[tuple[str, str, str], ...],
    path: str | Path,
    ylabel: str,
    title: str,
    log_y: bool = False,
) -> Path:
    # Curves of the entries ``key`` of ``curve`` against its ``beta``, log y
    # only where every value is positive.
    beta = np.asarray(curve["beta"], dtype=np.float64)
    order = np.argsort(beta)
    drawn = [
        (np.asarray(curve[key], dtype=np.float64)[order], style, label)
        for key, style, label in series
        if key in curve
    ]
    with _line_plot(path, "β", ylabel, title) as ax:
        for y, style, label in drawn:
            ax.plot(beta[order], y, style, ms=3, label=label)
        _log_axis(ax, beta)
        if log_y and drawn and np.all(np.concatenate([y for y, _, _ in drawn]) > 0):
            _log_scale(ax, "y")
    return Path(path)


_THEOREM_FIGURES = {
    "softplus": softplus_figure,
    "density": density_figure,
    "mc_error": mc_error_figure,
    "iid_bias": iid_bias_figure,
    "smoothing_vs_smoothgrad": smoothgrad_pcc_figure,
    "curvature": curvature_figure,
}


def theorem_figures(summary: Mapping[str, object], out_dir: str | Path) -> list[Path]:
    """Draw every theorem figure whose curve is in ``summary["curves"]``.

    Parameters
    ----------
    summary : mapping
        The theory summary (as written to ``theory.json``); its ``curves``
        entry holds ``softplus``, ``density``, ``mc_error``, ``iid_bias``,
        ``smoothing_vs_smoothgrad`` and ``curvature``. Missing curves are
        skipped.
    out_dir : str or Path
        Folder for the PNGs, named ``theorem_<curve>.png``.

    Returns
    -------
    list of Path
        The PNGs written, in the order above.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> x = np.linspace(-1, 1, 3)
    >>> s = {"curves": {"density": {"x": x, "logistic": x**2, "normal": x**2, "beta": 1}}}
    >>> [p.name for p in theorem_figures(s, tmp)]
    ['theorem_density.png']
    """
    curves = summary.get("curves", {}) or {}
    out_dir = Path(out_dir)
    return [
        draw(curves[name], out_dir / f"theorem_{name}.png")
        for name, draw in _THEOREM_FIGURES.items()
        if name in curves
    ]
