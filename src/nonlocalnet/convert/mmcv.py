"""mmcv's ``NonLocal1d/2d/3d`` and ``ContextBlock``: the blocks of mmaction2, mmdet and mmseg.

A standalone block's state_dict (``theta.conv.weight``, ``g.0.conv.weight``, ``conv_out.bn.*``;
``conv_mask``, ``channel_add_conv.{0,1,3}``) converts into our NonLocalNd / GlobalContext
(:mod:`nonlocalnet.convert._blocks` has the layouts). mmcv pools φ and g *after* their convs
(floor rounding), scales embedded-Gaussian logits by C'^-1/2 when ``use_scale`` (its default),
and has no bias in ``conv_out`` when a norm follows (ours is zero then).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_mmcv_context_block, map_mmcv_nonlocal
from nonlocalnet.convert._core import ConversionError, KeyMap

__all__ = ["map_standalone", "rename"]

NAME = "mmcv"
DESCRIPTION = "mmcv NonLocal1d/2d/3d and ContextBlock blocks (standalone)"


def is_nonlocal(state: Mapping[str, Any], prefix: str = "") -> bool:
    return f"{prefix}g.conv.weight" in state or f"{prefix}g.0.conv.weight" in state


def is_context_block(state: Mapping[str, Any], prefix: str = "") -> bool:
    return (
        f"{prefix}channel_add_conv.0.weight" in state
        or f"{prefix}channel_mul_conv.0.weight" in state
    )


def map_standalone(km: KeyMap, *, pairwise: str | None, use_scale: bool | None) -> bool:
    """Map a standalone mmcv block at the top level of ``km.src``; False when there is none."""
    if is_nonlocal(km.src):
        map_mmcv_nonlocal(km, "", "", pairwise=pairwise, use_scale=use_scale)
        return True
    if is_context_block(km.src):
        map_mmcv_context_block(km, "", "")
        return True
    return False


def rename(
    state: Mapping[str, Any],
    *,
    pairwise: str = "embedded_gaussian",
    use_scale: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """A standalone mmcv block → ours.

    Args:
        state: the block's state_dict.
        pairwise: mmcv's ``mode`` when the keys do not say it (embedded Gaussian and dot
            product share them); mmcv's default ``"embedded_gaussian"``.
        use_scale: mmcv's ``use_scale`` (default True).
        meta: unused.
    """
    km = KeyMap(NAME, dict(state))
    if not map_standalone(km, pairwise=pairwise, use_scale=use_scale):
        raise ConversionError(
            "mmcv: neither a NonLocal block (g.conv / g.0.conv) nor a ContextBlock "
            "(channel_add_conv / channel_mul_conv) at the top level"
        )
    km.refuse_unmapped("an mmcv block")
    return km
