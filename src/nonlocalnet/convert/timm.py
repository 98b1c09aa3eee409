"""timm: ``NonLocalAttn`` and ``GlobalContext`` blocks, and timm ResNets that carry them.

timm's ``resnet.ResNet`` with ``block_args=dict(attn_layer=...)`` puts the attention module of
each bottleneck in its ``se`` slot, after ``bn3`` and before the residual addition: GCNet's
placement, our bottleneck's ``gc`` slot. Its other keys are torchvision's (``conv1``, ``bn1``,
``layerN.i.{conv,bn}{1,2,3}``, ``downsample.{0,1}``, ``fc``), so a timm ResNet-50/101 with the
7×7 stem converts; the deep-stem variants (``resnet50d``: ``conv1.0``... and an average-pool
downsample) and the byobnet GC nets (``gcresnet50t``: a tiered stem) have no counterpart.

Blocks (:mod:`nonlocalnet.convert._blocks`): ``NonLocalAttn``'s logits are scaled by C^-1/2
(C the input width) where ours use C'^-1/2: θ is rescaled by √(C'/C), so the block is exact
with ``use_scale=True``. ``GlobalContext``: ``'gc'`` (timm's default) fuses by sigmoid scaling
only (``fusion=("mul",)``), ``'gca'`` by addition only; its LayerNorm2d eps is 1e-6 (ours 1e-5
unless ``norm_eps`` is given); timm does not zero the last conv's bias, which only
matters at initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_timm_global_context, map_timm_nonlocal
from nonlocalnet.convert._core import ConversionError, KeyMap, Rule

__all__ = ["rename"]

NAME = "timm"
DESCRIPTION = "timm NonLocalAttn / GlobalContext blocks and resnet.ResNet with them (7x7 stem)"

RULES = [
    Rule(r"^(conv1|bn1|fc)\.", r"\1."),
    Rule(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.", r"layer\1.\2.\3."),
]


def rename(
    state: Mapping[str, Any], *, use_scale: bool = True, meta: Mapping[str, Any] | None = None
) -> KeyMap:
    """timm keys → ours.

    Args:
        state: a ``NonLocalAttn``, a ``GlobalContext`` or a ``resnet.ResNet`` state_dict.
        use_scale: ``NonLocalAttn(use_scale=...)`` of the checkpoint (timm's default True).
        meta: unused.
    """
    km = KeyMap(NAME, dict(state))
    if "t.weight" in state and "z.weight" in state:
        map_timm_nonlocal(km, "", "", use_scale=use_scale)
    elif "mlp_add.fc1.weight" in state or "mlp_scale.fc1.weight" in state:
        map_timm_global_context(km, "", "")
    else:
        if "conv1.0.weight" in state:
            raise ConversionError(
                "timm: a deep-stem ResNet (conv1.0, conv1.1, ... : three 3x3 convs, the 'd'/'c' "
                "variants) has no counterpart in our ResNet (7x7 conv1)"
            )
        prefixes = sorted({m.group(0) for k in state if (m := re.match(r"^layer\d\.\d+\.se\.", k))})
        for p in prefixes:
            dst = p[: -len("se.")] + "gc."
            if f"{p}t.weight" in state:
                map_timm_nonlocal(km, p, dst, use_scale=use_scale)
            elif f"{p}mlp_add.fc1.weight" in state or f"{p}mlp_scale.fc1.weight" in state:
                map_timm_global_context(km, p, dst)
            else:
                raise ConversionError(
                    f"timm: attention module {p[:-1]} is neither NonLocalAttn nor GlobalContext "
                    f"(keys {sorted(k[len(p) :] for k in state if k.startswith(p))[:6]})"
                )
        km.rename_all(RULES)
    km.refuse_unmapped("a timm ResNet / NonLocalAttn / GlobalContext")
    if km.gc_options:
        km.notes.append(
            "timm GlobalContext: fusion "
            + (
                "by sigmoid scaling ('gc')"
                if km.gc_options["fusion"] == ("mul",)
                else repr(km.gc_options["fusion"])
            )
            + ", LayerNorm eps 1e-6"
        )
    return km
