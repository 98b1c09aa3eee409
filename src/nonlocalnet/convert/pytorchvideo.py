"""pytorchvideo ``create_resnet`` C2D / I3D checkpoints, and its ``create_nonlocal`` blocks.

``create_resnet`` builds ``Net(blocks=[stem, stage1, (pool,) stage2, stage3, stage4, head])``:
the stem ``blocks.0.{conv,norm}`` (conv T×7×7 stride 1×2×2, max pool 1×3×3 stride 1×2×2),
stages ``blocks.{k}.res_blocks.{i}`` with ``branch1_conv``/``branch1_norm`` and
``branch2.{conv,norm}_{a,b,c}``, an optional parameter-free ``stage1_pool`` (2×1×1) between the
first two stages (which shifts the later indices by one), and the head ``blocks.{last}.proj``.

``create_resnet`` has no place for ``create_nonlocal`` blocks (keys ``conv_theta``,
``conv_phi``, ``conv_g``, ``conv_out``, ``norm``; max pooling of x *before* φ and g, floor
rounding; ``softmax`` scaled by C'^-1/2): a block converts standalone, or inside a network when
it is wrapped with the residual block it follows, ``res_blocks[i] = nn.Sequential(res_block,
nonlocal)`` (keys ``res_blocks.{i}.0.*`` and ``res_blocks.{i}.1.*``).

The head averages windows of ``head_pool_kernel_size`` (4×7×7 by default) and then globally:
our global average when res5 has that size (8×224×224 clips with the stage-1 pool).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_fb_nonlocal
from nonlocalnet.convert._core import ConversionError, KeyMap, Rule

__all__ = ["rename"]

NAME = "pytorchvideo"
DESCRIPTION = "pytorchvideo create_resnet C2D / I3D (+ create_nonlocal blocks)"

_BR = {
    "conv_a": "conv1",
    "norm_a": "bn1",
    "conv_b": "conv2",
    "norm_b": "bn2",
    "conv_c": "conv3",
    "norm_c": "bn3",
}


def rename(
    state: Mapping[str, Any],
    *,
    instantiation: str = "softmax",
    sub_sample: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """pytorchvideo keys → ours.

    Args:
        state: a ``create_resnet`` state_dict, or a ``create_nonlocal`` block's.
        instantiation: ``create_nonlocal(instantiation=...)`` (its default ``"softmax"``).
        sub_sample: the blocks' ``pool_size`` is 1×2×2 (False: no pooling).
        meta: unused.
    """
    km = KeyMap(NAME, dict(state))
    if "conv_theta.weight" in state and not any(k.startswith("blocks.") for k in state):
        map_fb_nonlocal(km, "", "", norm="norm", instantiation=instantiation, sub_sample=sub_sample)
        km.refuse_unmapped("a pytorchvideo NonLocal block")
        return km
    stages = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.res_blocks\.", k))}
    )
    if len(stages) != 4:
        raise ConversionError(
            f"pytorchvideo: expected 4 stages (blocks.k.res_blocks), found {len(stages)} at "
            f"blocks {stages}"
        )
    heads = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.proj\.", k))}
    )
    stage_of = {k: s + 1 for s, k in enumerate(stages)}
    rules = [Rule(r"^blocks\.0\.conv\.", "conv1."), Rule(r"^blocks\.0\.norm\.", "bn1.")]
    if heads:
        rules.append(Rule(rf"^blocks\.{heads[-1]}\.proj\.", "fc."))

    def block(m: re.Match[str]) -> str:
        return f"layer{stage_of[int(m.group(1))]}.{m.group(2)}."

    wrapped = r"(?:\.0)?"
    rules += [
        Rule(
            rf"^blocks\.(\d+)\.res_blocks\.(\d+){wrapped}\.branch1_conv\.",
            lambda m: block(m) + "downsample.0.",
        ),
        Rule(
            rf"^blocks\.(\d+)\.res_blocks\.(\d+){wrapped}\.branch1_norm\.",
            lambda m: block(m) + "downsample.1.",
        ),
        Rule(
            rf"^blocks\.(\d+)\.res_blocks\.(\d+){wrapped}\.branch2\.(conv_[abc]|norm_[abc])\.",
            lambda m: block(m) + _BR[m.group(3)] + ".",
        ),
    ]
    nl = sorted(
        {m.group(0) for k in state if (m := re.match(r"^blocks\.(\d+)\.res_blocks\.(\d+)\.1\.", k))}
    )
    for prefix in nl:
        m = re.match(r"^blocks\.(\d+)\.res_blocks\.(\d+)\.1\.", prefix)
        dst = f"layer{stage_of[int(m.group(1))]}.{m.group(2)}.after."
        map_fb_nonlocal(
            km, prefix, dst, norm="norm", instantiation=instantiation, sub_sample=sub_sample
        )
    km.rename_all(rules)
    km.refuse_unmapped("a pytorchvideo create_resnet network")
    stage1_pool = stages[1] - stages[0] == 2
    km.builder_options.update(
        {
            "conv1_stride": (1, 2, 2),
            "pool1_kernel": (1, 3, 3),
            "pool1_stride": (1, 2, 2),
            "pool2_temporal": 2 if stage1_pool else 1,
        }
    )
    km.notes.append(
        "create_resnet's stem (conv stride 1x2x2, pool 1x3x3 stride 1x2x2)"
        + (", stage1_pool 2x1x1" if stage1_pool else ", no stage1_pool")
    )
    if heads:
        km.notes.append(
            "pytorchvideo's head averages 4x7x7 windows, then globally: the same as our global "
            "average when res5 is 4x7x7 (8x224x224 clips)"
        )
    return km
