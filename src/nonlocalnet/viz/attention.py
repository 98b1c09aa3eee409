"""Attention figures: arrows to the most attended positions (NL paper, Fig. 3) and heat maps.

Two layers:

* drawing functions that know nothing of models: :func:`draw_attention_arrows` and
  :func:`draw_attention_heatmap` take uint8 frames ``(T, H, W, 3)`` and pixel coordinates
  ``(t, y, x)`` (pixel/frame ``k`` centred on ``k``) and write a PNG with a grid of frames;
* :func:`attention_figure` hooks a block inside a model, reads its attention rows with
  ``block.attention_map``, maps feature positions to pixels (:mod:`nonlocalnet.viz.geometry`)
  and draws both figures per query.

Every attention block describes itself with ``block.layout(...)``
(:class:`~nonlocalnet.layers.layout.AttentionLayout`): where a query's row lies in
``block.attention_map``, and which feature positions each of its M keys stands for (one position
for NL without sub-sampling, GC and SNL; a 2×2 max-pool window with sub-sampling; an
adaptive-pooling cell of the pyramid for APNB/AFNB). :class:`QueryAttention` holds those rows and
cells, so arrows point at cell centres and heat maps spread each key's weight evenly over its
cell.

What the figures show, so that they do not mislead:

* one absolute colour scale per figure, from 0 to the largest weight shown (not min to max,
  which would turn weights of 0.062–0.064 against 1/M = 1/16 into a full colour range), with the
  uniform weight (1/M; per position for the heat map) drawn across the colour bar; perceptual
  maps (``ARROW_CMAP``, ``HEATMAP_CMAP``; ``SIGNED_CMAP`` for the dot product's signed weights);
* arrows only to keys of weight > ``MIN_WEIGHT``, numbered, with a table of the k keys, their
  weights and pixels beside the colour bar;
* the weight of the query's own key (:meth:`QueryAttention.self_key`), often most of the row,
  written next to the query marker; ``exclude_self`` leaves that key out of the top k and of the
  heat map's scale, renormalising nothing;
* heat maps drawn over the frames in grey, so that only the overlay has colour.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patheffects
from torch import Tensor, nn

from nonlocalnet.viz.geometry import AxisGeometry, FeatureGeometry, trace_geometry

__all__ = [
    "ARROW_CMAP",
    "HEATMAP_CMAP",
    "MIN_WEIGHT",
    "PANEL_INCHES",
    "SIGNED_CMAP",
    "AttentionFigures",
    "KeyCells",
    "QueryAttention",
    "attention_blocks",
    "attention_figure",
    "draw_attention_arrows",
    "draw_attention_heatmap",
    "format_weight",
    "frames_from_clip",
    "grey_frame",
    "grid_figsize",
    "pick_queries",
    "pixel_to_position",
    "query_attention",
    "resolve_block",
    "sample_dims",
]

logger = logging.getLogger(__name__)

#: Width and height of one frame panel, inches; figures are saved at ``DPI`` without trimming,
#: so a figure of n panels is exactly ``grid_figsize(n) * DPI`` pixels.
PANEL_INCHES = 3.2
#: A single frame (an image) gets a larger panel.
SINGLE_PANEL_INCHES = 5.0
DPI = 100
MAX_COLS = 4
_TITLE_INCHES = 0.8
#: Wide enough for a two-line title at the default font size.
MIN_WIDTH_INCHES = 7.5
_COLORBAR_INCHES = 1.2
#: The table of keys beside an arrow figure's colour bar.
_LEGEND_INCHES = 1.8
_LEGEND_LINE_INCHES = 0.11
#: Keys of weight at or below this get no arrow (a float32 softmax leaves the keys it rules out
#: at exactly 0 or within rounding of it; 1e-6 is also 1/1000 of the uniform weight 1/M up to
#: M = 1000).
MIN_WEIGHT = 1e-6
#: Perceptually uniform colour maps, from 0 to the largest weight shown: arrows (drawn over the
#: frames in colour, outlined in black and white) and heat maps (drawn over the frames in grey).
ARROW_CMAP = "plasma"
HEATMAP_CMAP = "magma"
#: Rows with negative weights (the NL block's dot product, f / N without a softmax) get a
#: diverging map with a dark centre, symmetric about 0, in both figures.
SIGNED_CMAP = "berlin"


# ---------------------------------------------------------------------------------------------
# which blocks


def _is_attention_block(m: nn.Module) -> bool:
    if not (callable(getattr(m, "attention_map", None)) and callable(getattr(m, "layout", None))):
        return False
    # GC with average pooling has the uniform map 1/N: nothing to see or analyse.
    return getattr(m, "pooling", "att") != "avg"


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks with an attention map, as ``(qualified name, module)``, in order.

    Blocks nested inside another attention block are not listed separately.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not _is_attention_block(m):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((name, m))
    return found


def _describe_children(model: nn.Module) -> str:
    parts = [f"{n} ({type(m).__name__})" for n, m in model.named_children()]
    return ", ".join(parts) if parts else type(model).__name__


def resolve_block(model: nn.Module, block_name: str | None = None) -> tuple[str, nn.Module]:
    """The attention block called ``block_name`` (the first one when None).

    Raises:
        ValueError: the model has no attention block (the message lists what it has), or no
            attention block of that name (the message lists the names there are).
    """
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError(
            f"no NonLocal/SNL/GC/APNB/AFNB blocks with an attention map in "
            f"{type(model).__name__}; model has: {_describe_children(model)}"
        )
    if block_name is None:
        return blocks[0]
    for name, m in blocks:
        if name == block_name:
            return name, m
    raise ValueError(
        f"unknown block {block_name!r}; expected one of {', '.join(repr(n) for n, _ in blocks)}"
    )


# ---------------------------------------------------------------------------------------------
# a block's attention, as rows over key cells


@dataclass
class KeyCells:
    """Which feature positions each of M keys stands for (a layout's ``key_cells``, on a grid).

    Attributes:
        geometry: the grid of the feature map the keys come from.
        key_index: ``(P,)`` key of each (key, position) pair.
        feat_index: ``(P,)`` flat (row major) feature position of each pair.
        share: ``(P,)`` 1 / (positions in the key's cell): a key's weight spread over its cell.
        num_keys: M.
    """

    geometry: FeatureGeometry
    key_index: Tensor
    feat_index: Tensor
    share: Tensor
    num_keys: int

    def centres(self) -> Tensor:
        """Input coordinates of the centre of each key's cell, ``(M, D)``."""
        pos = self.geometry.centres()[self.feat_index]  # (P, D)
        out = torch.zeros(self.num_keys, pos.shape[1], dtype=torch.float64)
        return out.index_add_(0, self.key_index, pos * self.share.unsqueeze(1))

    def density(self, weights: Tensor) -> Tensor:
        """Weight per feature position of one row ``(M,)``, as the feature grid ``(*S)``."""
        n = math.prod(self.geometry.size)
        w = weights.detach().to(torch.float64)[self.key_index] * self.share
        return (
            torch.zeros(n, dtype=torch.float64)
            .index_add_(0, self.feat_index, w)
            .reshape(self.geometry.size)
        )  # (*S)


@dataclass
class QueryAttention:
    """The attention rows of some queries of one block, with what their keys stand for.

    Attributes:
        kind: the block's layout kind: ``"pairwise"`` (NL), ``"query_independent"`` (SNL, GC)
            or ``"pyramid"`` (APNB, AFNB).
        positions: the query feature positions, e.g. (t, h, w).
        pixels: their input coordinates.
        rows: ``(Nq, M)`` normalised weights, from ``block.attention_map`` (the reference map).
        cells: per query, the cells of its M keys.
        query_geometry: the grid of the queries.
    """

    kind: str
    positions: list[tuple[int, ...]]
    pixels: list[tuple[float, ...]]
    rows: Tensor
    cells: list[KeyCells]
    query_geometry: FeatureGeometry

    def self_key(self, i: int) -> int | None:
        """The key of query i that stands for the query's own position, or None.

        For ``"pairwise"`` (NL) and ``"query_independent"`` (SNL, GC) blocks the keys partition
        the query map (single positions, or the 2×2 max-pooling windows of sub-sampling), so
        exactly one key holds the query's position: its weight is the query's attention to
        itself. The cells of a ``"pyramid"`` (APNB, AFNB) pool whole regions, one cell per bin
        holding the query, so none is the query's own: None.
        """
        cells = self.cells[i]
        if self.kind == "pyramid" or cells.geometry.size != self.query_geometry.size:
            return None
        flat = 0
        for p, n in zip(self.positions[i], cells.geometry.size, strict=True):
            flat = flat * n + p
        (own,) = cells.key_index[cells.feat_index == flat].tolist()
        return int(own)

    def topk(self, i: int, k: int, *, exclude_self: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The k most attended keys of query i: ``(indices, weights, centres (k, D))``.

        Args:
            i: the query.
            k: how many keys (at most M, or M - 1 without the query's own key).
            exclude_self: leave out the query's own key (:meth:`self_key`); the other weights are
                kept as they are (not renormalised).

        Raises:
            ValueError: ``exclude_self`` for a block whose keys have no own key (a pyramid).
        """
        row = self.rows[i].clone()
        candidates = row.numel()
        if exclude_self:
            own = self.self_key(i)
            if own is None:
                raise ValueError(
                    f"exclude_self needs a block whose keys are positions of the query map "
                    f"(pairwise or query_independent), got kind {self.kind!r} whose keys are "
                    "pooled pyramid cells"
                )
            row[own] = -math.inf
            candidates -= 1
        weights, idx = torch.topk(row, min(k, candidates))
        return idx, weights, self.cells[i].centres()[idx]


def query_attention(
    block: nn.Module,
    inputs: Sequence[Tensor],
    geometries: Sequence[FeatureGeometry],
    positions: Sequence[Sequence[int]],
) -> QueryAttention:
    """Attention rows of ``block`` for query feature positions of the first sample.

    Args:
        block: an attention block with ``layout`` and ``attention_map`` (NL, SNL, GC, APNB,
            AFNB).
        inputs: the block's inputs (AFNB: low, high); only sample 0 is used.
        geometries: their geometries (see :func:`~nonlocalnet.viz.geometry.trace_geometry`).
        positions: query positions on the query grid (AFNB: the high-level map).

    Returns:
        The rows and key cells.
    """
    xs = [t[:1] for t in inputs]
    qgeo, kgeo = geometries[-1], geometries[0]
    positions = [tuple(int(p) for p in pos) for pos in positions]
    for pos in positions:
        qgeo.to_pixel(pos)  # validates
    layout = block.layout(*(t.shape[2:] for t in xs))
    if kgeo.size != layout.key_size:
        raise ValueError(
            f"query_attention: the key geometry has size {kgeo.size}, but the block's keys are "
            f"drawn from a map of size {layout.key_size}"
        )
    fold, index = layout.locate(positions)
    if layout.kind == "bases":  # EMA: each query's weights over the positions, through the bases
        amap = block.attention_map(*xs, queries=index, over="positions")  # (B, Nq, N)
    else:
        amap = block.attention_map(*xs, queries=index)  # (B', Nq, M)
    rows = amap[fold.to(amap.device), torch.arange(len(positions), device=amap.device)]  # (Nq, M)
    by_fold: dict[int, KeyCells] = {}
    for f in fold.tolist():
        if f not in by_fold:
            by_fold[f] = KeyCells(kgeo, *layout.key_cells(f), layout.num_keys)
    cells = [by_fold[f] for f in fold.tolist()]
    pixels = [qgeo.to_pixel(p) for p in positions]
    return QueryAttention(layout.kind, positions, pixels, rows.detach().float(), cells, qgeo)


def pick_queries(x: Tensor, num: int, min_separation: int = 2) -> list[tuple[int, ...]]:
    """Positions of highest feature norm ``‖x_i‖`` (sample 0), at least ``min_separation`` apart.

    Args:
        x: the block's (query-side) input ``(B, C, *S)``.
        num: how many queries.
        min_separation: Chebyshev distance between picked positions, in feature positions.
    """
    size = tuple(x.shape[2:])
    norm = x[0].detach().float().norm(dim=0).reshape(-1)  # (N,)
    coords = torch.stack(torch.unravel_index(torch.arange(norm.numel()), size), dim=1)  # (N, D)
    picked: list[int] = []
    for i in torch.argsort(norm, descending=True).tolist():
        if all(int((coords[i] - coords[j]).abs().max()) >= min_separation for j in picked):
            picked.append(i)
        if len(picked) == num:
            break
    return [tuple(int(c) for c in coords[i]) for i in picked]


# ---------------------------------------------------------------------------------------------
# drawing


def _panel_inches(num_panels: int) -> float:
    return SINGLE_PANEL_INCHES if num_panels == 1 else PANEL_INCHES


def grid_figsize(num_panels: int, *, legend: bool = False) -> tuple[float, float]:
    """Figure size (inches) of a grid of ``num_panels`` frames with a title and a colour bar.

    Args:
        num_panels: frames shown.
        legend: the figure also has a column for a table of the drawn keys (arrow figures).
    """
    cols = min(num_panels, MAX_COLS)
    rows = math.ceil(num_panels / MAX_COLS)
    panel = _panel_inches(num_panels)
    extra = _COLORBAR_INCHES + (_LEGEND_INCHES if legend else 0.0)
    width = max(cols * panel + extra, MIN_WIDTH_INCHES)
    return (width, rows * panel + _TITLE_INCHES)


def _as_frames(frames: np.ndarray | Tensor) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3) or (H, W, 3), got {arr.dtype} {arr.shape}"
        )
    return arr


def _as_txy(p: Sequence[float]) -> tuple[float, float, float]:
    p = tuple(float(v) for v in p)
    if len(p) == 2:
        return (0.0, *p)
    if len(p) != 3:
        raise ValueError(f"pixel positions must be (t, y, x) or (y, x), got {p}")
    return p  # type: ignore[return-value]


def _frame_of(t: float, num_frames: int) -> int:
    return int(min(max(math.floor(t + 0.5), 0), num_frames - 1))


def _choose_frames(
    query_t: int, mass: dict[int, float], num_frames: int, max_frames: int
) -> list[int]:
    ranked = sorted((f for f in mass if f != query_t), key=lambda f: -mass[f])
    chosen = [query_t, *ranked[: max_frames - 1]]
    if len(chosen) < min(max_frames, num_frames):  # fill with evenly spaced frames
        for f in np.linspace(0, num_frames - 1, max_frames).round().astype(int).tolist():
            if f not in chosen and len(chosen) < max_frames:
                chosen.append(f)
    return sorted(chosen)


def _setup_grid(
    n: int, title: str, *, legend: bool = False
) -> tuple[plt.Figure, list[plt.Axes], plt.Axes, plt.Axes | None]:
    """A figure of n frame panels (rows of MAX_COLS), a title band, a colour bar axis and, with
    ``legend``, an empty axis for the table of keys right of the colour bar."""
    w, h = grid_figsize(n, legend=legend)
    fig = plt.figure(figsize=(w, h), dpi=DPI)
    cols = min(n, MAX_COLS)
    panel = _panel_inches(n)
    axes = []
    for i in range(n):
        r, c = divmod(i, MAX_COLS)
        left = (c * panel + 0.55) / w
        bottom = (h - _TITLE_INCHES - (r + 1) * panel + 0.5) / h
        axes.append(fig.add_axes((left, bottom, (panel - 0.75) / w, (panel - 0.85) / h)))
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / h, va="top")
    cax = fig.add_axes(
        ((cols * panel + 0.25) / w, 0.5 / h, 0.15 / w, (h - _TITLE_INCHES - 0.8) / h)
    )
    lax = None
    if legend:
        lax = fig.add_axes(
            (
                (cols * panel + _COLORBAR_INCHES) / w,
                0.5 / h,
                (_LEGEND_INCHES - 0.1) / w,
                (h - _TITLE_INCHES - 0.5) / h,
            )
        )
        lax.set_axis_off()
    return fig, axes, cax, lax


def _label_frame(ax: plt.Axes, frame: int, is_query: bool) -> None:
    ax.set_title(f"frame {frame}" + (" (query)" if is_query else ""), fontsize=9)
    ax.set_xlabel("x (pixels)", fontsize=8)
    ax.set_ylabel("y (pixels)", fontsize=8)
    ax.tick_params(labelsize=7)


def format_weight(w: float) -> str:
    """An attention weight as written on the figures: 3 significant digits (">0.999" for a
    weight just below 1, which would read as 1)."""
    text = f"{w:.3g}"
    return ">0.999" if text == "1" and w < 1 else text


def _rgb(frame: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 of a ``(H, W, 1)`` or ``(H, W, 3)`` frame."""
    return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame


def grey_frame(frame: np.ndarray) -> np.ndarray:
    """A frame in grey, ``(H, W, 3)`` uint8 with R = G = B = its luma (ITU-R BT.601 weights)."""
    rgb = _rgb(frame).astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])  # (H, W)
    return np.repeat(np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _colorbar(
    fig: plt.Figure,
    cax: plt.Axes,
    norm: matplotlib.colors.Normalize,
    cmap: matplotlib.colors.Colormap,
    label: str,
    mark: float | None,
    mark_label: str,
) -> matplotlib.colorbar.Colorbar:
    """A colour bar from 0 to ``norm.vmax`` (full opacity) with ``mark`` drawn across it."""
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.ax.tick_params(labelsize=7)
    if mark is not None:
        if mark <= norm.vmax:
            for colour, lw in (("white", 3.0), ("black", 1.2)):
                bar.ax.axhline(mark, color=colour, lw=lw)
            bar.ax.text(
                -0.4,
                mark,
                mark_label,
                transform=bar.ax.get_yaxis_transform(),
                ha="right",
                va="center",
                fontsize=7,
            )
            label = f"{label}\n{mark_label} = {format_weight(mark)} (line)"
        else:
            label = f"{label}\n{mark_label} = {format_weight(mark)}, above the scale"
    bar.set_label(label, fontsize=8)
    return bar


def _weight_scale(
    values: np.ndarray, cmap: str, fallback: float
) -> tuple[matplotlib.colors.Normalize, matplotlib.colors.Colormap]:
    """The colour scale of the weights shown: from 0 to the largest with ``cmap``; symmetric
    about 0, from -max |v| to max |v| with ``SIGNED_CMAP``, when some are negative. ``fallback``
    is the top of the scale when nothing above 0 is shown."""
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if lo < 0:
        top = max(-lo, hi)
        return matplotlib.colors.Normalize(-top, top), matplotlib.colormaps[SIGNED_CMAP]
    return matplotlib.colors.Normalize(0.0, hi if hi > 0 else fallback), matplotlib.colormaps[cmap]


def _scale_note(norm: matplotlib.colors.Normalize) -> str:
    return f"from {format_weight(norm.vmin)} to {format_weight(norm.vmax)}"


def _check_weight_options(min_weight: float, num_keys: int | None) -> None:
    if not (isinstance(min_weight, (int, float)) and math.isfinite(min_weight) and min_weight >= 0):
        raise ValueError(f"min_weight must be a finite number >= 0, got {min_weight!r}")
    if num_keys is not None and (isinstance(num_keys, bool) or not isinstance(num_keys, int)):
        raise TypeError(f"num_keys must be an int (M, the keys of the row), got {num_keys!r}")
    if num_keys is not None and num_keys < 1:
        raise ValueError(f"num_keys must be >= 1 (M, the keys of the row), got {num_keys}")


def _note_self(ax: plt.Axes, q: tuple[float, float, float], self_weight: float) -> plt.Annotation:
    return ax.annotate(
        f"self {format_weight(self_weight)}",
        xy=(q[2], q[1]),
        xytext=(0, 11),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=8,
        fontweight="bold",
        zorder=12,
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "black", "lw": 0.6, "alpha": 0.85},
        gid="self_weight",
    )


def _number_target(
    ax: plt.Axes,
    x: float,
    y: float,
    direction: tuple[float, float],
    rank: int,
    gap: float,
    extent: tuple[int, int],
) -> plt.Annotation:
    """Write the target's number ``gap`` points beyond (x, y), along ``direction`` (dx, dy in
    data units), turned back inwards near the edges of the ``(W, H)`` frame."""
    dx, dy = direction
    (width, height) = extent
    if (x > 0.9 * width and dx > 0) or (x < 0.1 * width and dx < 0):
        dx = -dx
    if (y > 0.9 * height and dy > 0) or (y < 0.1 * height and dy < 0):
        dy = -dy
    norm = math.hypot(dx, dy) or 1.0
    ux, uy = dx / norm, -dy / norm  # on screen: y points up, the image's y down
    return ax.annotate(
        str(rank),
        xy=(x, y),
        xytext=(gap * ux, gap * uy),
        textcoords="offset points",
        ha="left" if ux > 0.35 else "right" if ux < -0.35 else "center",
        va="bottom" if uy > 0.35 else "top" if uy < -0.35 else "center",
        fontsize=6.5,
        zorder=11,
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        gid="target_number",
    )


def _drop_overlaps(
    fig: plt.Figure, kept: list[plt.Annotation], labels: list[plt.Annotation]
) -> None:
    """Remove each label (in order) that overlaps one kept before it; the table still lists it."""
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in kept]
    for label in labels:
        box = label.get_window_extent(renderer)
        if any(box.overlaps(b) for b in boxes):
            label.remove()
        else:
            boxes.append(box)


def _key_table(
    lax: plt.Axes,
    targets: Sequence[tuple[float, float, float]],
    weights: np.ndarray,
    colours: Sequence[tuple[float, ...] | None],
    min_weight: float,
    video: bool,
) -> None:
    """The targets, numbered in order, with weight and pixel; those without an arrow in grey."""
    height = lax.get_position().height * lax.figure.get_figheight()
    rows = max(int(height / _LEGEND_LINE_INCHES), 4)
    step = 1.0 / rows
    coords = "(t, y, x)" if video else "(y, x)"
    lines: list[tuple[str, tuple[float, ...] | None, str]] = [
        ("# = arrow number", None, "black"),
        (f" #  {'weight':>8}  {coords}", None, "black"),
    ]
    reasons = []
    if any(abs(wi) <= min_weight for wi in weights):
        reasons.append(f" |weight| <= {min_weight:g}")
    if any(c is None and abs(wi) > min_weight for c, wi in zip(colours, weights, strict=True)):
        reasons.append(" frame not shown")
    notes = ["grey: no arrow:", *reasons] if reasons else []
    room = rows - len(lines) - len(notes)
    shown = len(targets) if len(targets) <= room else room - 1
    for i in range(shown):
        t, y, x = targets[i]
        pix = f"({t:g}, {y:g}, {x:g})" if video else f"({y:g}, {x:g})"
        grey = colours[i] is None
        lines.append(
            (
                f"{i + 1:>2}  {format_weight(weights[i]):>8}  {pix}",
                colours[i],
                "0.55" if grey else "black",
            )
        )
    if shown < len(targets):
        lines.append((f"    ... {len(targets) - shown} more", None, "black"))
    lines += [(n, None, "0.55") for n in notes]
    for r, (text, swatch, colour) in enumerate(lines):
        yy = 1.0 - (r + 0.5) * step
        lax.text(0.1, yy, text, transform=lax.transAxes, va="center", ha="left", fontsize=6.5,
                 family="monospace", color=colour, gid="key_table")  # fmt: skip
        if swatch is not None:
            lax.plot(0.03, yy, "s", ms=5, color=swatch, mec="black", mew=0.4,
                     transform=lax.transAxes, clip_on=False)  # fmt: skip


def draw_attention_arrows(
    frames: np.ndarray | Tensor,
    query_pixel: Sequence[float],
    target_pixels: Sequence[Sequence[float]],
    weights: Sequence[float] | Tensor,
    out_path: str | Path,
    title: str,
    *,
    max_frames: int = 8,
    num_keys: int | None = None,
    self_weight: float | None = None,
    min_weight: float = MIN_WEIGHT,
    legend: bool = True,
) -> Path:
    """Draw arrows from a query to its most attended positions on the frames (NL paper, Fig. 3).

    Each shown frame gets the arrows to the targets that lie in it, drawn from the query's (y, x);
    the query is a filled star on its own frame, an open circle on the others. Only targets of
    weight > ``min_weight`` get an arrow (a softmax leaves the keys it rules out at exactly 0 or
    within rounding of it: an arrow to them would read as attention); the title says how many.
    Colour (``ARROW_CMAP``) and width give the weight on an absolute scale, from 0 to the largest
    drawn weight (not min to max: near-uniform weights get nearly the same colour), and the
    colour bar marks the uniform weight 1/M. Rows with negative weights (dot product, f / N)
    are drawn by |weight| > ``min_weight``, coloured on ``SIGNED_CMAP`` from -max |weight| to
    max |weight|, width by |weight|. With ``legend``, the arrows
    are numbered in the order of ``target_pixels`` (where a number would cover another, only the
    heavier one is written) and a table beside the colour bar lists every target's number,
    weight and pixel. A target whose t is fractional (a feature frame that spans several input
    frames, e.g. centre 2.5 for frames 2 and 3) is drawn on the frame nearest to it, halves
    rounding up; a target at the query's own (y, x) is a ring around the query marker instead of
    an arrow.

    Args:
        frames: uint8 ``(T, H, W, 3)`` (a video clip as given to the model) or ``(H, W, 3)``.
        query_pixel: ``(t, y, x)`` (or ``(y, x)`` for an image) in input coordinates.
        target_pixels: ``(t, y, x)`` of each target, e.g. largest weight first.
        weights: attention weight of each target.
        out_path: PNG to write (folders are created).
        title: figure title (name the model, block and input); a line on what is drawn and the
            colour scale is added below it.
        max_frames: at most this many frames: the query's and those with most drawn weight.
        num_keys: M, the keys of the attention row: 1/M is marked on the colour bar.
        self_weight: the weight of the query's own key, written next to the query marker
            (whether or not that key is among the targets).
        min_weight: targets of |weight| at or below it get no arrow.
        legend: number the arrows and list the targets in a table (the figure is then
            ``grid_figsize(n, legend=True)``).

    Returns:
        ``out_path``.
    """
    arr = _as_frames(frames)
    T = arr.shape[0]
    q = _as_txy(query_pixel)
    targets = [_as_txy(p) for p in target_pixels]
    w = np.asarray(torch.as_tensor(weights, dtype=torch.float64).tolist(), dtype=float).ravel()
    if len(targets) != len(w):
        raise ValueError(
            f"draw_attention_arrows: {len(targets)} targets but {len(w)} weights; "
            "expected one weight per target"
        )
    _check_weight_options(min_weight, num_keys)
    drawn = [i for i, wi in enumerate(w) if abs(wi) > min_weight]
    qf = _frame_of(q[0], T)
    mass: dict[int, float] = {}
    for i in drawn:
        f = _frame_of(targets[i][0], T)
        mass[f] = mass.get(f, 0.0) + abs(float(w[i]))
    shown = _choose_frames(qf, mass, T, max_frames)
    norm, cmap = _weight_scale(w[drawn], ARROW_CMAP, 1.0 / num_keys if num_keys else 1.0)
    top = max(abs(norm.vmin), norm.vmax)
    signed = norm.vmin < 0
    note = (
        f"arrows: {len(drawn)} of {len(w)} keys (those of |weight| > {min_weight:g}); "
        f"colour: weight, {_scale_note(norm)}; width: |weight|"
        if signed
        else f"arrows: {len(drawn)} of {len(w)} keys (those of weight > {min_weight:g}); "
        f"colour and width: weight, {_scale_note(norm)}"
    )
    fig, axes, cax, lax = _setup_grid(len(shown), f"{title}\n{note}", legend=legend)
    colours: list[tuple[float, ...] | None] = [None] * len(w)
    kept: list[plt.Annotation] = []
    numbers: list[tuple[float, plt.Annotation]] = []
    extent = (arr.shape[2], arr.shape[1])
    for ax, f in zip(axes, shown, strict=True):
        ax.imshow(_rgb(arr[f]), interpolation="nearest")
        for i in sorted(drawn, key=lambda j: abs(w[j])):
            (t, y, x), wi = targets[i], float(w[i])
            if _frame_of(t, T) != f:
                continue
            rel = abs(wi) / top
            colours[i] = cmap(float(norm(wi)))
            lw = 1.0 + 2.5 * rel
            halo = [  # white, then black: the arrow stands out on dark and light frames
                patheffects.withStroke(linewidth=lw + 3.6, foreground="white"),
                patheffects.withStroke(linewidth=lw + 1.6, foreground="black"),
            ]
            if abs(y - q[1]) < 1e-9 and abs(x - q[2]) < 1e-9:
                ax.plot(
                    x, y, "o", ms=24, mfc="none", mec=colours[i], mew=lw, zorder=9,
                    path_effects=halo, gid="target_ring",
                )  # fmt: skip
                direction, gap = (1.0, 1.0), 12.0  # outside the ring
            else:
                ann = ax.annotate(
                    "",
                    xy=(x, y),
                    xytext=(q[2], q[1]),
                    arrowprops={
                        "arrowstyle": "-|>",
                        "color": colours[i],
                        "lw": lw,
                        "mutation_scale": 9 + 6 * rel,
                        "shrinkA": 0,
                        "shrinkB": 0,
                    },
                    zorder=8,
                    gid="arrow",
                )
                ann.arrow_patch.set_path_effects(halo)
                direction, gap = (x - q[2], y - q[1]), 5.0
            if legend:
                numbers.append((abs(wi), _number_target(ax, x, y, direction, i + 1, gap, extent)))
        if f == qf:
            ax.plot(q[2], q[1], "*", ms=16, mfc="cyan", mec="black", mew=1, zorder=10)
            if self_weight is not None:
                kept.append(_note_self(ax, q, float(self_weight)))
        else:
            ax.plot(
                q[2], q[1], "o", ms=9, mfc="none", mec="cyan", mew=2, zorder=10,
                path_effects=[patheffects.withStroke(linewidth=4, foreground="black")],
            )  # fmt: skip
        ax.set_xlim(-0.5, arr.shape[2] - 0.5)
        ax.set_ylim(arr.shape[1] - 0.5, -0.5)
        _label_frame(ax, f, f == qf)
    uniform = None if num_keys is None else 1.0 / num_keys
    _colorbar(fig, cax, norm, cmap, "attention weight (normalised f)", uniform, "1/M")
    if lax is not None:
        _drop_overlaps(fig, kept, [a for _, a in sorted(numbers, key=lambda n: -n[0])])
        _key_table(lax, targets, w, colours, min_weight, video=T > 1)
    return _save(fig, out_path)


def draw_attention_heatmap(
    frames: np.ndarray | Tensor,
    density: np.ndarray | Tensor,
    query_pixel: Sequence[float],
    out_path: str | Path,
    title: str,
    *,
    max_frames: int = 8,
    label: str = "attention weight per feature position",
    uniform: float | None = None,
    excluded: np.ndarray | Tensor | None = None,
    self_weight: float | None = None,
    cmap: str = HEATMAP_CMAP,
    alpha: float = 0.7,
) -> Path:
    """Overlay a query's attention (per input pixel) on the frames, drawn in grey (GCNet, Fig. 1).

    The frames are shown in grey (their luma) so that only the overlay carries colour; the
    overlay uses the perceptual colour map ``cmap`` on an absolute scale from 0 to the largest
    value shown (``SIGNED_CMAP``, symmetric about 0, when some are negative: dot product), with
    ``uniform`` marked on the colour bar.

    Args:
        frames: uint8 ``(T, H, W, 3)`` or ``(H, W, 3)``.
        density: ``(T, H, W)`` or ``(H, W)`` attention value at each input pixel (the weight of
            the feature position it belongs to).
        query_pixel: ``(t, y, x)`` or ``(y, x)``; marked with a star.
        out_path: PNG to write.
        title: figure title; a line with the colour scale is added below it.
        max_frames: the query's frame and those with most attention mass.
        label: colour bar label.
        uniform: the value uniform attention would give, marked on the colour bar.
        excluded: boolean, shaped like ``density``: pixels left out of the overlay and of its
            scale (outlined), e.g. the query's own key.
        self_weight: the weight of the query's own key, written next to the star.
        cmap: a matplotlib colour map name.
        alpha: opacity of the overlay.

    Returns:
        ``out_path``.
    """
    arr = _as_frames(frames)
    d = density.detach().cpu().numpy() if isinstance(density, Tensor) else np.asarray(density)
    d = d.astype(np.float64)
    if d.ndim == 2:
        d = d[None]
    if d.shape != arr.shape[:3]:
        raise ValueError(
            f"draw_attention_heatmap: density must have the frames' shape {arr.shape[:3]}, "
            f"got {d.shape}"
        )
    mask = np.zeros(d.shape, dtype=bool)
    if excluded is not None:
        mask = excluded.cpu().numpy() if isinstance(excluded, Tensor) else np.asarray(excluded)
        mask = (mask[None] if mask.ndim == 2 else mask).astype(bool)
        if mask.shape != d.shape:
            raise ValueError(
                f"draw_attention_heatmap: excluded must have the density's shape {d.shape}, "
                f"got {mask.shape}"
            )
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"draw_attention_heatmap: unknown colour map {cmap!r}")
    T = arr.shape[0]
    q = _as_txy(query_pixel)
    qf = _frame_of(q[0], T)
    kept = np.where(mask, 0.0, d)
    mass = {f: float(np.abs(kept[f]).sum()) for f in range(T)}
    shown = _choose_frames(qf, mass, T, max_frames)
    norm, scale_cmap = _weight_scale(kept[shown], cmap, uniform if uniform else 1.0)
    colours = scale_cmap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    fig, axes, cax, _ = _setup_grid(len(shown), f"{title}\ncolour: {_scale_note(norm)}")
    for ax, f in zip(axes, shown, strict=True):
        ax.imshow(grey_frame(arr[f]), interpolation="nearest")
        ax.imshow(
            np.ma.masked_array(d[f], mask=mask[f]),
            cmap=colours,
            norm=norm,
            alpha=alpha,
            interpolation="nearest",
        )
        if mask[f].any():
            ax.contour(mask[f].astype(float), levels=[0.5], colors="cyan", linewidths=1.2)
        if f == qf:
            ax.plot(q[2], q[1], "*", ms=16, mfc="cyan", mec="black", mew=1, zorder=10)
            if self_weight is not None:
                _note_self(ax, q, float(self_weight))
        ax.set_xlim(-0.5, arr.shape[2] - 0.5)
        ax.set_ylim(arr.shape[1] - 0.5, -0.5)
        _label_frame(ax, f, f == qf)
    _colorbar(fig, cax, norm, scale_cmap, label, uniform, "uniform")
    return _save(fig, out_path)


def _save(fig: plt.Figure, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    logger.info("wrote %s", out)
    return out


# ---------------------------------------------------------------------------------------------
# model-level


def frames_from_clip(clip: Tensor) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` frames for display from a normalised model input.

    Each channel is stretched to [0, 255] (min-max over the clip).

    Args:
        clip: ``(C, T, H, W)`` (or ``(1, C, T, H, W)``) or ``(C, H, W)``.
    """
    x = clip.detach().cpu().float()
    if x.dim() == 5:
        x = x[0]  # drop the batch dim: (C, T, H, W)
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (C, 1, H, W)
    if x.dim() != 4:
        raise ValueError(f"clip must be (C, T, H, W) or (C, H, W), got shape {tuple(clip.shape)}")
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1, -1)
    return (x[:3].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)


def _nearest_position(axis: AxisGeometry, n: int) -> Tensor:
    """The feature position nearest to each of the ``n`` input pixels along ``axis``.

    Halves round up (as frames do in the arrow figures), so that with a stride of 2 every
    feature position gets two pixels (round-half-to-even would give even positions 3, odd 1).
    """
    idx = torch.floor((torch.arange(n, dtype=torch.float64) - axis.start) / axis.jump + 0.5)
    return idx.clamp(0, axis.size - 1).long()


def _pixel_density(cells: KeyCells, row: Tensor, frames_shape: Sequence[int]) -> np.ndarray:
    """Per-pixel attention ``(T, H, W)``: each pixel takes its nearest feature position's weight."""
    dens = cells.density(row)  # (*S)
    geo = cells.geometry
    T, H, W = frames_shape
    idx = [_nearest_position(a, n) for a, n in zip(geo.axes[-2:], (H, W), strict=True)]
    if len(geo.axes) == 3:
        ti = _nearest_position(geo.axes[0], T)
        out = dens[ti][:, idx[0]][:, :, idx[1]]  # (T, H, W)
    else:
        out = dens[idx[0]][:, idx[1]].expand(T, -1, -1)  # (T, H, W)
    return out.numpy()


@dataclass
class AttentionFigures:
    """What :func:`attention_figure` drew.

    Attributes:
        block_name: qualified name of the block in the model.
        block_type: its class name.
        attention: the rows and cells of the queries.
        topk: per query, ``(key indices, weights, key pixel centres (k, D))``, largest first
            (without the query's own key when ``exclude_self``).
        self_keys: per query, its own key (:meth:`QueryAttention.self_key`; None for a pyramid).
        self_weights: per query, the weight of its own key (None when there is none).
        exclude_self: whether the own key was left out of ``topk`` and the figures.
        paths: written PNGs, per query ``[arrows, heatmap]``.
    """

    block_name: str
    block_type: str
    attention: QueryAttention
    topk: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    self_keys: list[int | None] = field(default_factory=list)
    self_weights: list[float | None] = field(default_factory=list)
    exclude_self: bool = False
    paths: list[list[Path]] = field(default_factory=list)


def _uniform_density(cells: KeyCells) -> float | None:
    """Weight per feature position under uniform attention 1/M, if the same at every position.

    1/M for keys that are single positions, 1/N with 2×2 pooled keys; None for a pyramid, whose
    overlapping cells give uneven values.
    """
    dens = cells.density(torch.full((cells.num_keys,), 1.0 / cells.num_keys)).reshape(-1)
    covered = dens[torch.unique(cells.feat_index)]
    lo, hi = float(covered.min()), float(covered.max())
    return hi if hi - lo <= 1e-9 * hi else None


def pixel_to_position(geo: FeatureGeometry, pixel: Sequence[float]) -> tuple[int, ...]:
    """The feature position whose centre is nearest to an input pixel.

    Args:
        geo: the feature grid.
        pixel: ``(t, y, x)`` for a 3d grid, ``(y, x)`` (or ``(t, y, x)``, t ignored) for 2d.

    Raises:
        ValueError: wrong number of coordinates, or a pixel outside the input.
    """
    pixel = tuple(float(p) for p in pixel)
    if len(pixel) != len(geo.axes):
        if len(pixel) == 3 and len(geo.axes) == 2:
            pixel = pixel[1:]
        else:
            raise ValueError(
                f"query {pixel} must have {len(geo.axes)} coordinates "
                f"({'t, y, x' if len(geo.axes) == 3 else 'y, x'})"
            )
    for p, a in zip(pixel, geo.axes, strict=True):
        if not -0.5 <= p <= a.input_size - 0.5:
            raise ValueError(f"query {pixel} lies outside the input of size {geo.input_size}")
    return tuple(int(a.nearest(torch.tensor([p]))[0]) for p, a in zip(pixel, geo.axes, strict=True))


def sample_dims(model: nn.Module) -> int:
    """Dims of one input sample: 4 ``(C, T, H, W)`` if the first conv is 3d, else 3 ``(C, H, W)``.

    Raises:
        ValueError: the model has no convolution to tell from.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return {nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}[type(m)]
    raise ValueError(f"cannot tell the input layout of {type(model).__name__}: it has no conv")


@torch.no_grad()
def attention_figure(
    model: nn.Module,
    clip: Tensor,
    *,
    frames: np.ndarray | Tensor | None = None,
    block_name: str | None = None,
    queries: Sequence[Sequence[float]] | None = None,
    num_queries: int = 3,
    k: int = 20,
    out_dir: str | Path = "attention",
    model_name: str | None = None,
    input_name: str = "input",
    max_frames: int = 8,
    exclude_self: bool = False,
    min_weight: float = MIN_WEIGHT,
    legend: bool = True,
) -> AttentionFigures:
    """Draw, for some queries of one attention block, arrows to its top-k keys and a heat map.

    Both figures use an absolute colour scale from 0 to the largest weight shown and mark the
    uniform weight on the colour bar; the weight of the query's own key (its attention to itself,
    often the largest) is written next to the query marker.

    Args:
        model: the network (set to eval mode here).
        clip: its input for one sample, ``(C, T, H, W)`` / ``(C, H, W)`` (or with batch dim 1).
        frames: uint8 ``(T, H, W, 3)`` frames to draw on; by default the clip, min-max stretched.
        block_name: qualified name of the block (see :func:`attention_blocks`); the first if None.
        queries: query pixels ``(t, y, x)`` (``(y, x)`` for images), each mapped to the nearest
            feature position; by default ``num_queries`` positions of highest input-feature norm.
        num_queries: how many queries to pick when ``queries`` is None.
        k: arrows per query.
        out_dir: folder for ``{block}_q{i}_arrows.png`` and ``{block}_q{i}_heatmap.png``.
        model_name: name shown in the titles (default: the model's class name).
        input_name: name of the input shown in the titles.
        max_frames: frames per figure.
        exclude_self: leave the query's own key out of the top k (the next key takes its place)
            and out of the heat map (its cell is outlined), renormalising nothing; the titles
            say so and give its weight. Not for pyramid blocks (APNB, AFNB), whose keys have no
            own key.
        min_weight: keys of weight at or below it get no arrow (see :data:`MIN_WEIGHT`).
        legend: number the arrows and list the top-k keys, their weights and pixels in a
            table beside the arrows' colour bar.

    Returns:
        The positions, top-k keys, own keys and written paths.

    Raises:
        ValueError: a bad clip, frames or query, or ``exclude_self`` for a pyramid block.
    """
    model.eval()
    name, block = resolve_block(model, block_name)
    dims = sample_dims(model)
    layout = "(C, T, H, W)" if dims == 4 else "(C, H, W)"
    if dims not in (3, 4):
        raise ValueError(
            f"attention_figure: needs an image or video model, {type(model).__name__} takes "
            "1d sequences (B, C, L)"
        )
    x = clip.unsqueeze(0) if clip.dim() == dims else clip  # (1, C, *S)
    if x.dim() != dims + 1 or x.shape[0] != 1:
        raise ValueError(
            f"attention_figure: clip must be one sample {layout} (or with a batch dim of 1), "
            f"got shape {tuple(clip.shape)}"
        )
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    inputs, geometries = trace_geometry(model, x, block)
    if frames is None:
        frames = frames_from_clip(x[0].cpu())
    arr = _as_frames(frames)
    spatial = tuple(x.shape[2:]) if dims == 4 else (1, *x.shape[2:])
    if tuple(arr.shape[:3]) != spatial:
        raise ValueError(
            f"attention_figure: frames must match the clip's (T, H, W) = {spatial}, "
            f"got {tuple(arr.shape[:3])}"
        )
    qgeo = geometries[-1]
    if queries is None:
        positions = pick_queries(inputs[-1], num_queries)
    else:
        positions = [pixel_to_position(qgeo, p) for p in queries]
    att = query_attention(block, inputs, geometries, positions)
    if exclude_self and att.kind == "pyramid":
        raise ValueError(
            f"attention_figure: exclude_self needs a block whose keys are positions of the query "
            f"map, got {name!r} ({type(block).__name__}) whose keys are pooled pyramid cells"
        )
    model_name = model_name or type(model).__name__
    result = AttentionFigures(name, type(block).__name__, att, exclude_self=exclude_self)
    out_dir = Path(out_dir)
    tag = name.replace(".", "_") or "block"
    for i, pos in enumerate(att.positions):
        own = att.self_key(i)
        own_w = None if own is None else float(att.rows[i, own])
        result.self_keys.append(own)
        result.self_weights.append(own_w)
        idx, w, centres = att.topk(i, k, exclude_self=exclude_self)
        result.topk.append((idx, w, centres))
        qpix = _as_txy(att.pixels[i])
        targets = [_as_txy(c) for c in centres.tolist()]
        head = (
            f"{model_name} · {name} ({type(block).__name__}, {att.kind}) · {input_name}\n"
            f"query {i}: feature {pos} -> pixel (t, y, x) = "
            f"({qpix[0]:.1f}, {qpix[1]:.1f}, {qpix[2]:.1f})"
        )
        if own_w is None:
            own_note = ""
        elif exclude_self:
            own_note = f"; own key excluded (weight {format_weight(own_w)})"
        else:
            own_note = f"; own key weight {format_weight(own_w)}"
        arrows = draw_attention_arrows(
            arr,
            qpix,
            targets,
            w,
            out_dir / f"{tag}_q{i}_arrows.png",
            f"{head}; top {len(targets)} of M = {att.rows.shape[1]} keys{own_note}",
            max_frames=max_frames,
            num_keys=int(att.rows.shape[1]),
            self_weight=own_w,
            min_weight=min_weight,
            legend=legend,
        )
        cells = att.cells[i]
        dens = _pixel_density(cells, att.rows[i], arr.shape[:3])
        excluded = None
        if exclude_self and own is not None:
            onehot = torch.zeros(cells.num_keys)
            onehot[own] = 1.0
            excluded = _pixel_density(cells, onehot, arr.shape[:3]) > 0
        heat = draw_attention_heatmap(
            arr,
            dens,
            qpix,
            out_dir / f"{tag}_q{i}_heatmap.png",
            f"{head}; attention map{own_note}",
            max_frames=max_frames,
            uniform=_uniform_density(cells),
            excluded=excluded,
            self_weight=own_w,
        )
        result.paths.append([arrows, heat])
    return result
