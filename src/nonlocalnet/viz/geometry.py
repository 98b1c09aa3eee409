"""Where a feature position of a block lies in the input: feature (t, h, w) -> pixel (t, y, x).

Coordinates are continuous, with the centre of input pixel (or frame) ``k`` at ``k``, so an axis
of ``L`` input pixels spans ``[-0.5, L - 0.5]`` (matplotlib's ``imshow`` convention). Along each
axis a feature map of a stack of convolutions and poolings is a regular grid: position ``i`` is
centred on the input coordinate

    centre(i) = start + i · jump

where ``jump`` is the product of the strides of the layers before it and ``start`` the centre of
position 0. Walking the layers in order, a layer with kernel k, stride s, padding p and dilation
d updates them as

    start += ((d·(k - 1)) / 2 - p) · jump        (jump before the layer)
    jump  *= s
    size   = ⌊(size + 2p - d·(k - 1) - 1) / s⌋ + 1   (⌈·⌉ for pools with ceil_mode)

so a 'same'-padded layer (p = d(k-1)/2) moves no centre, and a 2×2 pool with stride 2 centres
position 0 between pixels 0 and 1 (start 0.5). The centre is that of the receptive field of
position i, which is also the centre of its cell of the feature grid.

:func:`trace_geometry` finds these numbers for a block inside a model by running one forward pass
with hooks on the convolutions and poolings executed before the block. Layers of a parallel
branch (e.g. a bottleneck's shortcut convolution) are skipped: a layer counts only if its input
has the spatial size of the main stream at that point. If the traced size does not match the size
of the tensor that reaches the block (an operation outside ``nn.Module`` changed it), the
geometry falls back to the documented shape ratio: ``jump = L_in / L_feat`` and
``start = (jump - 1) / 2`` (each position centred on its share of the input), with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "AxisGeometry",
    "FeatureGeometry",
    "Layer",
    "compose",
    "layer_of",
    "ratio_geometry",
    "trace_geometry",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AxisGeometry:
    """One axis of a feature grid in input coordinates.

    Attributes:
        jump: input pixels between neighbouring feature positions (cumulative stride).
        start: input coordinate of the centre of feature position 0.
        size: feature positions along the axis.
        input_size: input pixels (frames) along the axis.
    """

    jump: float
    start: float
    size: int
    input_size: int

    def centre(self, i: float) -> float:
        """Input coordinate of the centre of feature position ``i``."""
        return self.start + i * self.jump

    def nearest(self, coords: Tensor) -> Tensor:
        """Feature position whose centre is nearest to each input coordinate (clamped)."""
        idx = torch.round((coords.to(torch.float64) - self.start) / self.jump)
        return idx.clamp(0, self.size - 1).long()


@dataclass(frozen=True)
class FeatureGeometry:
    """A feature grid (one :class:`AxisGeometry` per spatial dim) in input coordinates.

    Attributes:
        axes: one per spatial dimension of the feature map, in order ((T, H, W), (H, W) or (L,)).
        exact: False when the geometry came from the shape-ratio fallback.
    """

    axes: tuple[AxisGeometry, ...]
    exact: bool = True

    @property
    def size(self) -> tuple[int, ...]:
        """The feature grid's size."""
        return tuple(a.size for a in self.axes)

    @property
    def input_size(self) -> tuple[int, ...]:
        """The input's size along the same axes."""
        return tuple(a.input_size for a in self.axes)

    def to_pixel(self, position: Sequence[int]) -> tuple[float, ...]:
        """Input coordinates of the centre of a feature position, e.g. (t, h, w) -> (t, y, x).

        Raises:
            ValueError: the position has the wrong length or lies outside the grid.
        """
        position = tuple(int(p) for p in position)
        if len(position) != len(self.axes):
            raise ValueError(
                f"to_pixel: position must have {len(self.axes)} coordinates for a grid of size "
                f"{self.size}, got {position}"
            )
        if any(not 0 <= p < a.size for p, a in zip(position, self.axes, strict=True)):
            raise ValueError(f"to_pixel: position {position} lies outside the grid {self.size}")
        return tuple(a.centre(p) for p, a in zip(position, self.axes, strict=True))

    def centres(self) -> Tensor:
        """Input coordinates of every feature position, row major: ``(N, D)`` float64."""
        ticks = [a.start + a.jump * torch.arange(a.size, dtype=torch.float64) for a in self.axes]
        grids = torch.meshgrid(*ticks, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=1)  # (N, D)


@dataclass(frozen=True)
class Layer:
    """Kernel, stride, padding and dilation of one layer along every axis."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool = False


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    return v * n if len(v) == 1 else v


def layer_of(module: nn.Module, input_size: Sequence[int]) -> Layer | None:
    """The :class:`Layer` of a convolution or pooling module; None for other modules.

    Args:
        module: any module.
        input_size: spatial size of its input (resolves ``padding="same"``).
    """
    n = len(input_size)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    if not isinstance(module, conv + pool):
        return None
    kernel = _tuple(module.kernel_size, n)
    stride = _tuple(module.stride if module.stride is not None else module.kernel_size, n)
    dilation = _tuple(getattr(module, "dilation", 1), n)
    padding = module.padding
    if isinstance(padding, str):  # convs: "valid" or "same" (stride 1)
        padding = (
            tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
            if padding == "same"
            else (0,) * n
        )
    return Layer(
        kernel=kernel,
        stride=stride,
        padding=_tuple(padding, n),
        dilation=dilation,
        ceil_mode=bool(getattr(module, "ceil_mode", False)),
    )


def _step(axis: AxisGeometry, k: int, s: int, p: int, d: int, ceil_mode: bool) -> AxisGeometry:
    span = d * (k - 1)
    start = axis.start + (span / 2 - p) * axis.jump
    frac = (axis.size + 2 * p - span - 1) / s
    size = (math.ceil(frac) if ceil_mode else math.floor(frac)) + 1
    if ceil_mode and (size - 1) * s >= axis.size + p:  # PyTorch: last window must start inside
        size -= 1
    return AxisGeometry(jump=axis.jump * s, start=start, size=size, input_size=axis.input_size)


def compose(layers: Sequence[Layer], input_size: Sequence[int]) -> FeatureGeometry:
    """Geometry of the feature map after ``layers`` applied in order to an input.

    Args:
        layers: the layers on the path from the input to the feature map.
        input_size: spatial size of the input, e.g. (T, H, W).
    """
    axes = [AxisGeometry(1.0, 0.0, int(n), int(n)) for n in input_size]
    for layer in layers:
        if len(layer.kernel) != len(axes):
            raise ValueError(
                f"compose: layer has {len(layer.kernel)} spatial dims, input has {len(axes)}"
            )
        axes = [
            _step(a, k, s, p, d, layer.ceil_mode)
            for a, k, s, p, d in zip(
                axes, layer.kernel, layer.stride, layer.padding, layer.dilation, strict=True
            )
        ]
    return FeatureGeometry(tuple(axes))


def ratio_geometry(input_size: Sequence[int], feature_size: Sequence[int]) -> FeatureGeometry:
    """Fallback geometry from sizes alone: ``jump = L_in / L_feat``, ``start = (jump - 1) / 2``."""
    axes = []
    for n_in, n_feat in zip(input_size, feature_size, strict=True):
        jump = n_in / n_feat
        axes.append(AxisGeometry(jump, (jump - 1) / 2, int(n_feat), int(n_in)))
    return FeatureGeometry(tuple(axes), exact=False)


def _spatial(t: object, dims: int) -> tuple[int, ...] | None:
    if isinstance(t, Tensor) and t.dim() == dims + 2:
        return tuple(t.shape[2:])
    return None


@torch.no_grad()
def trace_geometry(
    model: nn.Module, x: Tensor, block: nn.Module
) -> tuple[tuple[Tensor, ...], list[FeatureGeometry]]:
    """Run ``model(x)`` up to ``block`` and find the geometry of each of the block's inputs.

    Args:
        model: the network; put it in eval mode first.
        x: its input ``(B, C, *S)``, S = (T, H, W) for video, (H, W) for images.
        block: a submodule of ``model``.

    Returns:
        ``(inputs, geometries)``: the tensors passed to ``block`` on its first call (detached)
        and, for each input with the same number of spatial dims as ``x``, its
        :class:`FeatureGeometry` (for AFNB: low then high).

    Raises:
        ValueError: ``block`` is never called by ``model(x)``.
    """
    dims = x.dim() - 2
    input_size = tuple(x.shape[2:])
    current = FeatureGeometry(tuple(AxisGeometry(1.0, 0.0, n, n) for n in input_size))
    history: list[FeatureGeometry] = [current]
    state: dict[str, object] = {"done": False, "inputs": None}
    handles = []

    class _ReachedBlockError(Exception):
        pass

    def layer_hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        nonlocal current
        if state["done"] or not args:
            return
        size_in = _spatial(args[0], dims)
        if size_in is None or size_in != current.size:
            return  # another branch (shortcut) or not a feature map
        layer = layer_of(module, size_in)
        size_out = _spatial(out, dims)
        if layer is None:
            if size_out is not None and size_out != size_in and not list(module.children()):
                logger.debug("trace_geometry: %s changes the size; not understood", module)
            return
        geo = compose([layer], (1,) * dims)  # one step from identity, then chain
        axes = tuple(
            AxisGeometry(
                jump=a.jump * g.jump,
                start=a.start + g.start * a.jump,
                size=n,
                input_size=a.input_size,
            )
            for a, g, n in zip(
                current.axes,
                geo.axes,
                size_out if size_out is not None else current.size,
                strict=True,
            )
        )
        current = FeatureGeometry(axes)
        history.append(current)

    def block_hook(module: nn.Module, args: tuple[object, ...]) -> None:
        if state["done"]:
            return
        state["done"] = True
        state["inputs"] = tuple(a.detach() for a in args if isinstance(a, Tensor))
        raise _ReachedBlockError

    for m in model.modules():
        if m is block:
            continue
        if layer_of(m, (1,) * dims) is not None or not list(m.children()):
            handles.append(m.register_forward_hook(layer_hook))
    handles.append(block.register_forward_pre_hook(block_hook))
    try:
        model(x)
    except _ReachedBlockError:
        pass
    finally:
        for h in handles:
            h.remove()
    inputs = state["inputs"]
    if inputs is None:
        raise ValueError(f"trace_geometry: the block {type(block).__name__} was not called")
    geometries = []
    for t in inputs:
        size = _spatial(t, dims)
        if size is None:
            continue
        match = next((g for g in reversed(history) if g.size == size), None)
        if match is None:
            logger.warning(
                "trace_geometry: no traced layer gives size %s (input %s); using the shape "
                "ratio (jump = input/feature, centred cells)",
                size,
                input_size,
            )
            match = ratio_geometry(input_size, size)
        geometries.append(match)
    return inputs, geometries
