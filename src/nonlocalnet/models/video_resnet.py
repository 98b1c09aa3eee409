"""Video ResNets of the NL paper: C2D and I3D (3×1×1 or 3×3×3), one builder, and inflation.

C2D is a 2D ResNet applied to video: every kernel is 1×k×k and time is reduced by pooling
only. I3D inflates kernels in time. Both come from :func:`create_video_resnet` with different
arguments (pytorchvideo style). Defaults follow the paper's Table 1 and the official code for
a 32-frame clip: ``conv1`` with temporal stride 2 (32 → 16), ``pool1`` with temporal stride 2
(16 → 8 at res2), ``pool2`` (2×1×1 max) after res2 (8 → 4 from res3 on), global average
pooling, dropout 0.5, FC. Input ``(B, 3, 32, 224, 224)`` → res5 features ``(B, 2048, 4, 7, 7)``.

Inflation patterns (per stage, per block: 1 = inflate), the official code's for I3D 3×1×1:
all of res2; res3 blocks 0, 2; res4 blocks 0, 2, 4, ...; res5 block 1, with ``conv1`` 5×7×7.
``"3x1x1"`` inflates the first 1×1 convolution of those bottlenecks to 3×1×1, ``"3x3x3"`` their
3×3 convolution to 3×3×3 (basic blocks: their first 3×3 convolution, either way).

Loading a 2D checkpoint (:func:`inflate_state_dict`, :func:`load_2d_checkpoint`) repeats each
kernel t times along time and divides by t, so on a clip of identical frames a 3D convolution
computes exactly the 2D one, except at frames within t//2 of either end, where the zero
temporal padding makes the sum miss terms. C2D (t = 1 everywhere) is therefore exactly the 2D
network frame by frame; an inflated network agrees on frames far enough from both ends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet._checks import check_choice
from nonlocalnet.models.builders import add_blocks
from nonlocalnet.models.placement import Placement
from nonlocalnet.models.resnet import DEPTHS, ResNet

__all__ = [
    "INFLATIONS",
    "create_video_resnet",
    "inflate_state_dict",
    "load_2d_checkpoint",
    "official_inflation_pattern",
]

logger = logging.getLogger(__name__)

INFLATIONS = (None, "3x1x1", "3x3x3")


def official_inflation_pattern(layers: Sequence[int]) -> list[list[int]]:
    """The official I3D pattern: all of res2, even blocks of res3/res4, odd blocks of res5.

    For R50 ``[[1,1,1], [1,0,1,0], [1,0,1,0,1,0], [0,1,0]]``.
    """
    n2, n3, n4, n5 = layers
    return [
        [1] * n2,
        [int(i % 2 == 0) for i in range(n3)],
        [int(i % 2 == 0) for i in range(n4)],
        [int(i % 2 == 1) for i in range(n5)],
    ]


def create_video_resnet(
    *,
    depth: int = 50,
    block: str | None = None,
    layers: Sequence[int] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_channels: int = 64,
    in_channels: int = 3,
    num_classes: int = 400,
    conv1_kernel: Sequence[int] | None = None,
    conv1_stride: Sequence[int] = (2, 2, 2),
    pool1_kernel: Sequence[int] | None = (2, 3, 3),
    pool1_stride: Sequence[int] = (2, 2, 2),
    pool1_padding: int | Sequence[int] | None = None,
    pool2_temporal: int = 2,
    inflation: str | None = None,
    inflation_pattern: Sequence[Sequence[int]] | None = None,
    dropout: float = 0.5,
    nonlocal_placement: Placement | None = None,
    nonlocal_kwargs: Mapping[str, Any] | None = None,
    nonlocal_block: str = "nl",
    gc_placement: Placement | None = None,
    gc_kwargs: Mapping[str, Any] | None = None,
    zero_init_residual: bool = False,
    norm: str = "bn",
    grad_checkpointing: bool = False,
    default_input: Sequence[int] = (3, 32, 224, 224),
) -> ResNet:
    """Build a C2D or I3D video ResNet, optionally with non-local blocks.

    The backbone is initialised first; the NL blocks are added afterwards (after the listed
    residual blocks, in ``layerN.i.after``) and keep their own zero initialisation, so a fresh
    NL network computes exactly the network without blocks.

    Args:
        depth: 18, 34, 50, 101 or 152 (ignored when ``block`` and ``layers`` are given).
        block: ``"basic"`` or ``"bottleneck"`` with ``layers``, for custom (tiny) networks.
        layers: residual blocks per stage, any positive depths.
        widths: ``planes`` of the four stages.
        stem_channels: channels of ``conv1``.
        in_channels: input channels.
        num_classes: classes (Kinetics-400 by default); 0 for no head.
        conv1_kernel: (t, k, k) of ``conv1``; default 1×7×7 (C2D) or 5×7×7 (inflated).
        conv1_stride: (t, s, s) stride of ``conv1``.
        pool1_kernel: (t, k, k) of the max pooling after the stem, or None for none.
        pool1_stride: its stride.
        pool1_padding: its (t, h, w) padding; None pads ``(k - 1) // 2`` (0 in time, 1 in space
            for the 2×3×3 pooling: 112 → 56); the official Caffe2 nets pad 0 (112 → 55).
        pool2_temporal: temporal max pooling after res2 (kernel = stride); 1 turns it off.
        inflation: None (C2D), ``"3x1x1"`` or ``"3x3x3"``.
        inflation_pattern: per stage, per block, 1 to inflate; default
            :func:`official_inflation_pattern`.
        dropout: dropout before the classifier.
        nonlocal_placement: per stage, indices of the residual blocks followed by an NL block.
        nonlocal_kwargs: keyword arguments of :class:`~nonlocalnet.NonLocal3d` (default
            ``sub_sample=True``: the paper's spatially sub-sampled blocks).
        nonlocal_block: the block ``nonlocal_placement`` places: ``"nl"`` or any block of
            :func:`nonlocalnet.layers.create_block` that keeps its input's shape (``"dnl"``,
            ``"cca"``...).
        gc_placement: per stage, residual blocks holding a 3d ``GlobalContext`` before the
            residual addition.
        gc_kwargs: keyword arguments of the GC blocks.
        zero_init_residual: zero the last BN gamma of each residual block.
        norm: ``"bn"`` or ``"frozen_bn"``.
        grad_checkpointing: recompute residual blocks in backward.
        default_input: (C, T, H, W) stored on the model as ``default_input``.

    Returns:
        The network (a :class:`~nonlocalnet.models.resnet.ResNet` with ``dims=3``).
    """
    check_choice("inflation", inflation, INFLATIONS)
    if block is None or layers is None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        block, layers = DEPTHS[depth]
    layers = tuple(layers)
    if conv1_kernel is None:
        conv1_kernel = (1, 7, 7) if inflation is None else (5, 7, 7)
    temporal_first = temporal_mid = None
    if inflation is not None:
        pattern = (
            official_inflation_pattern(layers)
            if inflation_pattern is None
            else [list(p) for p in inflation_pattern]
        )
        kernels = [[3 if f else 1 for f in p] for p in pattern]
        if inflation == "3x1x1" or block == "basic":
            temporal_first = kernels
        else:
            temporal_mid = kernels
    elif inflation_pattern is not None:
        raise ValueError("inflation_pattern needs inflation='3x1x1' or '3x3x3'")
    model = ResNet(
        block,
        layers,
        num_classes=num_classes,
        in_channels=in_channels,
        stem_channels=stem_channels,
        widths=widths,
        zero_init_residual=zero_init_residual,
        norm=norm,
        grad_checkpointing=grad_checkpointing,
        dims=3,
        conv1_kernel=tuple(conv1_kernel),
        conv1_stride=tuple(conv1_stride),
        pool1_kernel=None if pool1_kernel is None else tuple(pool1_kernel),
        pool1_stride=tuple(pool1_stride),
        pool1_padding=pool1_padding,
        pool2_temporal=pool2_temporal,
        temporal_kernels=temporal_first,
        temporal_kernels_mid=temporal_mid,
        dropout=dropout,
    )
    model.inflation = inflation
    model.default_input = tuple(default_input)
    add_blocks(
        model,
        dims=3,
        nonlocal_placement=nonlocal_placement,
        nonlocal_kwargs=nonlocal_kwargs,
        nonlocal_block=nonlocal_block,
        gc_placement=gc_placement,
        gc_kwargs=gc_kwargs,
    )
    return model


def inflate_state_dict(
    state_2d: Mapping[str, Tensor], model_3d: nn.Module
) -> tuple[dict[str, Tensor], list[str]]:
    """Map a 2D ResNet state_dict onto a video network with the same keys.

    A 2D kernel ``(O, I, k, k)`` becomes ``(O, I, t, k, k)``: repeated t times along time and
    divided by t, t being the video kernel's temporal size (computed in the video network's
    dtype). Other tensors are copied.

    Args:
        state_2d: the 2D network's state_dict (torchvision keys).
        model_3d: the video network.

    Returns:
        ``(state, skipped)``: the state_dict for ``model_3d`` (keys of both whose shapes
        match after inflation) and the keys of ``state_2d`` left out (absent from the video
        network, or with another shape, e.g. ``fc`` for another number of classes).
    """
    target = model_3d.state_dict()
    state, skipped = {}, []
    for key, src in state_2d.items():
        dst = target.get(key)
        if dst is None:
            skipped.append(key)
            continue
        if src.dim() == 4 and dst.dim() == 5 and src.shape == dst.shape[:2] + dst.shape[3:]:
            t = dst.shape[2]
            # (O, I, k, k) -> (O, I, t, k, k), each temporal slice w/t, in the video network's
            # precision (a float32 checkpoint into a float64 network sums back to w exactly)
            w = src.to(dst.dtype) if dst.is_floating_point() else src
            state[key] = w.unsqueeze(2).expand(-1, -1, t, -1, -1).div(t).contiguous()
        elif src.shape == dst.shape:
            state[key] = src.clone()
        else:
            skipped.append(key)
    return state, skipped


def load_2d_checkpoint(
    model_3d: nn.Module, state_2d: Mapping[str, Tensor] | str
) -> nn.modules.module._IncompatibleKeys:
    """Initialise a video network from a 2D ResNet checkpoint (ImageNet initialisation).

    Args:
        model_3d: the video network.
        state_2d: a 2D state_dict, or the path of a file holding one (``torch.save`` of a
            state_dict or of a dict with a ``"model"`` / ``"state_dict"`` entry).

    Returns:
        The result of ``load_state_dict(strict=False)``: ``missing_keys`` are the video
        network's keys not initialised (inserted blocks, a head of another size).

    Raises:
        ValueError: no tensor of the checkpoint fits the video network (another architecture,
            keys of another library), with the number of tensors and a few of their keys.
    """
    if isinstance(state_2d, str):
        loaded = torch.load(state_2d, map_location="cpu", weights_only=True)
        for k in ("model", "state_dict"):
            if isinstance(loaded, dict) and isinstance(loaded.get(k), dict):
                loaded = loaded[k]
                break
        state_2d = loaded
    state, skipped = inflate_state_dict(state_2d, model_3d)
    if not state:
        keys = list(state_2d)
        raise ValueError(
            f"load_2d_checkpoint: none of the {len(keys)} tensors of the checkpoint fits "
            f"{type(model_3d).__name__} (keys such as {', '.join(keys[:4]) or 'none'}); a 2D "
            "ResNet with torchvision's keys is expected (nonlocalnet.convert converts others)"
        )
    if skipped:
        logger.info("2D checkpoint keys not loaded: %s", ", ".join(skipped))
    return model_3d.load_state_dict(state, strict=False)
