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
from torch import Tensor, nn

from nonlocalnet.viz.geometry import FeatureGeometry, trace_geometry

__all__ = [
    "PANEL_INCHES",
    "AttentionFigures",
    "KeyCells",
    "QueryAttention",
    "attention_blocks",
    "attention_figure",
    "draw_attention_arrows",
    "draw_attention_heatmap",
    "frames_from_clip",
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

    def topk(self, i: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The k most attended keys of query i: ``(indices, weights, centres (k, D))``."""
        row = self.rows[i]
        k = min(k, row.numel())
        weights, idx = torch.topk(row, k)
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


def grid_figsize(num_panels: int) -> tuple[float, float]:
    """Figure size (inches) of a grid of ``num_panels`` frames with a title and a colour bar."""
    cols = min(num_panels, MAX_COLS)
    rows = math.ceil(num_panels / MAX_COLS)
    panel = _panel_inches(num_panels)
    width = max(cols * panel + _COLORBAR_INCHES, MIN_WIDTH_INCHES)
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


def _setup_grid(n: int, title: str) -> tuple[plt.Figure, list[plt.Axes], plt.Axes]:
    """A figure of n frame panels (rows of MAX_COLS), a title band and a colour bar axis."""
    fig = plt.figure(figsize=grid_figsize(n), dpi=DPI)
    w, h = grid_figsize(n)
    cols = min(n, MAX_COLS)
    panel = _panel_inches(n)
    axes = []
    for i in range(n):
        r, c = divmod(i, MAX_COLS)
        left = (c * panel + 0.55) / w
        bottom = (h - _TITLE_INCHES - (r + 1) * panel + 0.5) / h
        axes.append(fig.add_axes((left, bottom, (panel - 0.75) / w, (panel - 0.85) / h)))
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / h, va="top")
    cax = fig.add_axes(
        ((cols * panel + 0.25) / w, 0.5 / h, 0.15 / w, (h - _TITLE_INCHES - 0.8) / h)
    )
    return fig, axes, cax


def _label_frame(ax: plt.Axes, frame: int, is_query: bool) -> None:
    ax.set_title(f"frame {frame}" + (" (query)" if is_query else ""), fontsize=9)
    ax.set_xlabel("x (pixels)", fontsize=8)
    ax.set_ylabel("y (pixels)", fontsize=8)
    ax.tick_params(labelsize=7)


def draw_attention_arrows(
    frames: np.ndarray | Tensor,
    query_pixel: Sequence[float],
    target_pixels: Sequence[Sequence[float]],
    weights: Sequence[float] | Tensor,
    out_path: str | Path,
    title: str,
    *,
    max_frames: int = 8,
) -> Path:
    """Draw arrows from a query to its most attended positions on the frames (NL paper, Fig. 3).

    Each shown frame gets the arrows to the targets that lie in it, drawn from the query's (y, x);
    the query is a filled star on its own frame, an open circle on the others. Arrow colour and
    width grow with the weight. A target whose t is fractional (a feature frame that spans
    several input frames, e.g. centre 2.5 for frames 2 and 3) is drawn on the frame nearest to
    it, halves rounding up; a target at the query's own (y, x) is a circle instead of an arrow.

    Args:
        frames: uint8 ``(T, H, W, 3)`` (a video clip as given to the model) or ``(H, W, 3)``.
        query_pixel: ``(t, y, x)`` (or ``(y, x)`` for an image) in input coordinates.
        target_pixels: ``(t, y, x)`` of each target.
        weights: attention weight of each target.
        out_path: PNG to write (folders are created).
        title: figure title (name the model, block and input).
        max_frames: at most this many frames: the query's and those with most target weight.

    Returns:
        ``out_path``.
    """
    arr = _as_frames(frames)
    T = arr.shape[0]
    q = _as_txy(query_pixel)
    targets = [_as_txy(p) for p in target_pixels]
    w = np.asarray(torch.as_tensor(weights, dtype=torch.float64).tolist(), dtype=float)
    if len(targets) != len(w):
        raise ValueError(
            f"draw_attention_arrows: {len(targets)} targets but {len(w)} weights; "
            "expected one weight per target"
        )
    qf = _frame_of(q[0], T)
    mass: dict[int, float] = {}
    for (t, _, _), wi in zip(targets, w, strict=True):
        f = _frame_of(t, T)
        mass[f] = mass.get(f, 0.0) + float(wi)
    shown = _choose_frames(qf, mass, T, max_frames)
    fig, axes, cax = _setup_grid(len(shown), title)
    wmin, wmax = (float(w.min()), float(w.max())) if len(w) else (0.0, 1.0)
    if wmax <= wmin:
        wmax = wmin + 1e-12
    norm = matplotlib.colors.Normalize(vmin=wmin, vmax=wmax)
    cmap = matplotlib.colormaps["autumn_r"]
    for ax, f in zip(axes, shown, strict=True):
        ax.imshow(arr[f], interpolation="nearest")
        for (t, y, x), wi in sorted(zip(targets, w, strict=True), key=lambda tw: tw[1]):
            if _frame_of(t, T) != f:
                continue
            rel = norm(wi)
            if abs(y - q[1]) < 1e-9 and abs(x - q[2]) < 1e-9:
                ax.plot(x, y, "o", ms=4 + 6 * rel, mfc="none", mec=cmap(rel), mew=2)
                continue
            ax.annotate(
                "",
                xy=(x, y),
                xytext=(q[2], q[1]),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": cmap(rel),
                    "lw": 0.8 + 2.2 * rel,
                    "mutation_scale": 8 + 6 * rel,
                    "shrinkA": 0,
                    "shrinkB": 0,
                },
            )
        if f == qf:
            ax.plot(q[2], q[1], "*", ms=18, mfc="cyan", mec="black", mew=1, zorder=10)
        else:
            ax.plot(q[2], q[1], "o", ms=9, mfc="none", mec="cyan", mew=2)
        ax.set_xlim(-0.5, arr.shape[2] - 0.5)
        ax.set_ylim(arr.shape[1] - 0.5, -0.5)
        _label_frame(ax, f, f == qf)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("attention weight (normalised f)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
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
) -> Path:
    """Overlay a query's attention (per input pixel) on the frames (GCNet, Fig. 1).

    Args:
        frames: uint8 ``(T, H, W, 3)`` or ``(H, W, 3)``.
        density: ``(T, H, W)`` or ``(H, W)`` attention value at each input pixel (the weight of
            the feature position it belongs to).
        query_pixel: ``(t, y, x)`` or ``(y, x)``; marked with a star.
        out_path: PNG to write.
        title: figure title.
        max_frames: the query's frame and those with most attention mass.
        label: colour bar label.

    Returns:
        ``out_path``.
    """
    arr = _as_frames(frames)
    d = density.detach().cpu().numpy() if isinstance(density, Tensor) else np.asarray(density)
    if d.ndim == 2:
        d = d[None]
    if d.shape != arr.shape[:3]:
        raise ValueError(
            f"draw_attention_heatmap: density must have the frames' shape {arr.shape[:3]}, "
            f"got {d.shape}"
        )
    T = arr.shape[0]
    q = _as_txy(query_pixel)
    qf = _frame_of(q[0], T)
    mass = {f: float(d[f].sum()) for f in range(T)}
    shown = _choose_frames(qf, mass, T, max_frames)
    fig, axes, cax = _setup_grid(len(shown), title)
    vmin, vmax = float(d.min()), float(d.max())
    if vmax <= vmin:
        vmax = vmin + 1e-12
    im = None
    for ax, f in zip(axes, shown, strict=True):
        ax.imshow(arr[f], interpolation="nearest")
        im = ax.imshow(d[f], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax, interpolation="nearest")
        if f == qf:
            ax.plot(q[2], q[1], "*", ms=18, mfc="white", mec="black", mew=1, zorder=10)
        _label_frame(ax, f, f == qf)
    bar = fig.colorbar(im, cax=cax)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
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


def _pixel_density(cells: KeyCells, row: Tensor, frames_shape: Sequence[int]) -> np.ndarray:
    """Per-pixel attention ``(T, H, W)``: each pixel takes its nearest feature position's weight."""
    dens = cells.density(row)  # (*S)
    geo = cells.geometry
    T, H, W = frames_shape
    idx = [a.nearest(torch.arange(n)) for a, n in zip(geo.axes[-2:], (H, W), strict=True)]
    if len(geo.axes) == 3:
        ti = geo.axes[0].nearest(torch.arange(T))
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
        topk: per query, ``(key indices, weights, key pixel centres (k, D))``, largest first.
        paths: written PNGs, per query ``[arrows, heatmap]``.
    """

    block_name: str
    block_type: str
    attention: QueryAttention
    topk: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    paths: list[list[Path]] = field(default_factory=list)


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
) -> AttentionFigures:
    """Draw, for some queries of one attention block, arrows to its top-k keys and a heat map.

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

    Returns:
        The positions, top-k keys and written paths.
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
    model_name = model_name or type(model).__name__
    result = AttentionFigures(name, type(block).__name__, att)
    out_dir = Path(out_dir)
    tag = name.replace(".", "_") or "block"
    for i, pos in enumerate(att.positions):
        idx, w, centres = att.topk(i, k)
        result.topk.append((idx, w, centres))
        qpix = _as_txy(att.pixels[i])
        targets = [_as_txy(c) for c in centres.tolist()]
        head = (
            f"{model_name} · {name} ({type(block).__name__}, {att.kind}) · {input_name}\n"
            f"query {i}: feature {pos} -> pixel (t, y, x) = "
            f"({qpix[0]:.1f}, {qpix[1]:.1f}, {qpix[2]:.1f})"
        )
        arrows = draw_attention_arrows(
            arr,
            qpix,
            targets,
            w,
            out_dir / f"{tag}_q{i}_arrows.png",
            f"{head}; top {len(targets)} keys",
            max_frames=max_frames,
        )
        dens = _pixel_density(att.cells[i], att.rows[i], arr.shape[:3])
        heat = draw_attention_heatmap(
            arr,
            dens,
            qpix,
            out_dir / f"{tag}_q{i}_heatmap.png",
            f"{head}; attention map",
            max_frames=max_frames,
        )
        result.paths.append([arrows, heat])
    return result
