"""mmdet ResNet backbones with GC / NL plugins (GCNet's Mask R-CNN models).

mmdet's ``ResNet`` has torchvision's keys under ``backbone.`` (``conv1``, ``bn1``,
``layerN.i.{conv,bn}{1,2,3}``, ``downsample.{0,1}``; style ``'pytorch'``: stride on the 3×3
conv). Plugins sit inside the bottleneck at ``position='after_conv3'`` (after ``bn3``, before the
residual addition: our ``gc`` slot) and are named by mmcv's abbreviation:
``layerN.i.context_block`` (``ContextBlock``: ``conv_mask``, ``channel_add_conv.{0,1,3}``) and
``layerN.i.nonlocal_block`` (``NonLocal2d``). GCNet's configs add the ContextBlock (r = 1/16 or
1/4, add fusion) to every block of c3–c5, which is :func:`~nonlocalnet.models.zoo.gc_resnet50`
(``num_classes=0``: a backbone has no classifier).

Only the backbone converts here: the FPN neck, the RPN and RoI heads are reported as dropped.
Standalone mmcv blocks convert too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_mmcv_context_block, map_mmcv_nonlocal
from nonlocalnet.convert._core import KeyMap, Rule
from nonlocalnet.convert.mmcv import map_standalone

__all__ = ["rename"]

NAME = "mmdet"
DESCRIPTION = "mmdet ResNet backbones with ContextBlock / NonLocal2d plugins (backbone only)"

#: top-level modules of a detector other than the backbone.
DETECTOR_PARTS = ("neck", "rpn_head", "roi_head", "bbox_head", "mask_head", "semantic_head")

RULES = [
    Rule(r"^(?:backbone\.)?(conv1|bn1)\.", r"\1."),
    Rule(r"^(?:backbone\.)?layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.", r"layer\1.\2.\3."),
]


def rename(
    state: Mapping[str, Any],
    *,
    pairwise: str = "embedded_gaussian",
    use_scale: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """mmdet keys → a backbone of ours (``layerN.i.gc`` for the plugins).

    Args:
        state: a detector's or a backbone's state_dict.
        pairwise: mode of NonLocal2d plugins when the keys do not say it.
        use_scale: their ``use_scale``.
        meta: unused.
    """
    km = KeyMap(NAME, dict(state))
    if map_standalone(km, pairwise=pairwise, use_scale=use_scale):
        km.refuse_unmapped("an mmcv block")
        return km
    dropped: dict[str, int] = {}
    for key in state:
        top = key.split(".")[0]
        if top in DETECTOR_PARTS:
            km.ignore(key, "detector parts (FPN neck, RPN/RoI heads): only the backbone converts")
            dropped[top] = dropped.get(top, 0) + 1
        elif top == "data_preprocessor":
            km.ignore(key, "input normalisation of mmdet's data preprocessor")
    plugin = re.compile(r"^(?:backbone\.)?(layer\d\.\d+)\.(context_block|nonlocal_block)\w*\.")
    seen: set[str] = set()
    for key in state:
        m = plugin.match(key)
        if m is None or m.group(0) in seen:
            continue
        seen.add(m.group(0))
        dst = f"{m.group(1)}.gc."
        if m.group(2) == "context_block":
            map_mmcv_context_block(km, m.group(0), dst)
        else:
            map_mmcv_nonlocal(km, m.group(0), dst, pairwise=pairwise, use_scale=use_scale)
    km.rename_all(RULES)
    km.refuse_unmapped("an mmdet ResNet backbone")
    if dropped:
        km.notes.append(
            "backbone only; dropped "
            + ", ".join(f"{n} keys of {top}" for top, n in dropped.items())
        )
    km.notes.append(
        "assumes mmdet's style='pytorch' (stride on the 3x3 conv) and plugins at "
        "position='after_conv3' (GCNet's configs); neither is stored in the weights"
    )
    return km
