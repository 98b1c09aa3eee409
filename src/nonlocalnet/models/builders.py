"""Builders of ResNets with attention blocks: the backbone first, then the blocks.

:func:`create_resnet` builds a 2D :class:`~nonlocalnet.models.resnet.ResNet` (torchvision's keys)
and :func:`add_blocks` inserts NL blocks after, and GC blocks inside, listed residual blocks of
any of our ResNets (2D or 3D), so that the backbone's initialisation never touches the blocks'
zero-initialised layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nonlocalnet.layers import GlobalContext, create_block
from nonlocalnet.models.placement import insert_context_blocks, place_blocks
from nonlocalnet.models.resnet import DEPTHS, ResNet

__all__ = ["add_blocks", "create_resnet"]


def create_resnet(
    *,
    depth: int = 50,
    num_classes: int = 1000,
    in_channels: int = 3,
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
    output_stride: int | None = None,
    zero_init_residual: bool = False,
    norm: str = "bn",
    grad_checkpointing: bool = False,
    block: str | None = None,
    layers: Sequence[int] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_channels: int = 64,
    deep_stem: bool = False,
    dropout: float = 0.0,
    nonlocal_placement: Sequence[Sequence[int]] | None = None,
    nonlocal_kwargs: Mapping[str, Any] | None = None,
    nonlocal_block: str = "nl",
    gc_placement: Sequence[Sequence[int]] | None = None,
    gc_kwargs: Mapping[str, Any] | None = None,
    default_input: Sequence[int] = (3, 224, 224),
) -> ResNet:
    """Build a 2D ResNet (torchvision's keys), optionally with NL and/or GC blocks.

    The backbone is initialised first; blocks are added afterwards and keep their own zero
    initialisation (NL after residual blocks in ``layerN.i.after``, GC inside bottlenecks in
    ``layerN.i.gc``).

    Args:
        depth: 18, 34, 50, 101 or 152 (ignored when ``block`` and ``layers`` are given).
        num_classes: classes of ``fc`` (0: no head).
        in_channels: input channels.
        replace_stride_with_dilation: see :class:`ResNet`.
        output_stride: 8, 16 or 32: shortcut for ``replace_stride_with_dilation``.
        zero_init_residual: zero the last BN gamma of each residual block.
        norm: ``"bn"`` or ``"frozen_bn"``.
        grad_checkpointing: recompute residual blocks in backward.
        block: ``"basic"`` or ``"bottleneck"``, with ``layers``, for custom (tiny) networks.
        layers: blocks per stage, with ``block``.
        widths: stage widths.
        stem_channels: ``conv1`` channels.
        deep_stem: mmseg's ResNetV1c stem (three 3×3 convs, ``stem.*`` keys) instead of
            ``conv1``/``bn1``.
        dropout: dropout before ``fc``.
        nonlocal_placement: per stage, residual blocks followed by a ``NonLocal2d``.
        nonlocal_kwargs: keyword arguments of those blocks (:class:`~nonlocalnet.NonLocal2d`).
        nonlocal_block: the block placed by ``nonlocal_placement`` (see :func:`add_blocks`).
        gc_placement: per stage, residual blocks holding a ``GlobalContext`` before the
            residual addition.
        gc_kwargs: keyword arguments of :class:`~nonlocalnet.layers.global_context.GlobalContext`.
        default_input: (C, H, W) stored on the model as ``default_input``.

    Returns:
        The initialised network.
    """
    if block is None or layers is None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        block, layers = DEPTHS[depth]
    if output_stride is not None:
        rsd = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
        if output_stride not in rsd:
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        replace_stride_with_dilation = rsd[output_stride]
    model = ResNet(
        block,
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        replace_stride_with_dilation=replace_stride_with_dilation,
        zero_init_residual=zero_init_residual,
        norm=norm,
        grad_checkpointing=grad_checkpointing,
        widths=widths,
        stem_channels=stem_channels,
        deep_stem=deep_stem,
        dropout=dropout,
    )
    model.default_input = tuple(default_input)
    add_blocks(
        model,
        dims=2,
        nonlocal_placement=nonlocal_placement,
        nonlocal_kwargs=nonlocal_kwargs,
        nonlocal_block=nonlocal_block,
        gc_placement=gc_placement,
        gc_kwargs=gc_kwargs,
    )
    return model


def add_blocks(
    model: ResNet,
    *,
    dims: int,
    nonlocal_placement: Sequence[Sequence[int]] | None = None,
    nonlocal_kwargs: Mapping[str, Any] | None = None,
    nonlocal_block: str = "nl",
    gc_placement: Sequence[Sequence[int]] | None = None,
    gc_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Insert NL blocks after, and GC blocks inside, the listed residual blocks (in place).

    ``nonlocal_block`` names the block placed after residual blocks: ``"nl"`` (the non-local
    block; sub-sampled by default in video networks) or any block of the factory that keeps
    its input's shape (:func:`nonlocalnet.layers.create_block`: ``"dnl"``, ``"cca"``...).
    """
    if nonlocal_placement is not None and any(len(p) for p in nonlocal_placement):
        nl_kw = dict(nonlocal_kwargs or {})
        if dims == 3 and nonlocal_block.startswith("nl"):
            nl_kw.setdefault("sub_sample", True)

        def make(channels: int) -> Any:
            return create_block(nonlocal_block, channels, dims=dims, **nl_kw)

        place_blocks(model, nonlocal_placement, make)
    elif nonlocal_kwargs:
        raise ValueError("nonlocal_kwargs given without nonlocal_placement")
    if gc_placement is not None and any(len(p) for p in gc_placement):
        gc_kw = dict(gc_kwargs or {})
        insert_context_blocks(model, gc_placement, lambda c: GlobalContext(c, dims=dims, **gc_kw))
    elif gc_kwargs:
        raise ValueError("gc_kwargs given without gc_placement")
