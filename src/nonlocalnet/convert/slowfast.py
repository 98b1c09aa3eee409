"""SlowFast (facebookresearch/SlowFast) C2D / I3D / NL checkpoints of its ``ResNet`` model.

Keys (``slowfast/models/{stem,resnet,nonlocal,head}_helper.py``): the stem
``s1.pathway0_stem.{conv,bn}``; residual blocks ``s{2..5}.pathway0_res{i}`` with
``branch1``/``branch1_bn`` (projection shortcut) and ``branch2.{a,b,c}{,_bn}``; non-local
blocks ``s{k}.pathway0_nonlocal{i}.{conv_theta, conv_phi, conv_g, conv_out, bn}`` after
residual block i; the head ``head.projection``. Stage ``s{k}`` is our ``layer{k-1}`` (res{k}).

The stem is ``ResNetBasicStem``: conv (T×7×7, stride 1×2×2), BN, ReLU, max pool 1×3×3 stride
1×2×2 padding (0, 1, 1); ``pathway0_pool`` (2×1×1, the ``_POOL1`` of c2d/i3d) follows res2;
BN eps 1e-5. ``Nonlocal`` max-pools x (``NONLOCAL.POOL`` 1×2×2, floor) *before* φ and g;
``softmax`` scales the logits by C'^-1/2, ``dot_product`` (the config default) divides by the
number of keys; ``conv_out`` has a bias. A checkpoint file is ``{"model_state": ...,
"optimizer_state": ..., "epoch": ...}``; ``NONLOCAL.GROUP`` > 1 (time folded into groups) is
not supported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_fb_nonlocal
from nonlocalnet.convert._core import KeyMap, Rule

__all__ = ["rename"]

NAME = "slowfast"
DESCRIPTION = "SlowFast ResNet C2D / I3D / NL checkpoints (s1..s5, head.projection)"

_B2 = {"a": "1", "b": "2", "c": "3"}


def _layer(m: re.Match[str]) -> str:
    return f"layer{int(m.group(1)) - 1}.{m.group(2)}."


RULES = [
    Rule(r"^s1\.pathway0_stem\.conv\.", "conv1."),
    Rule(r"^s1\.pathway0_stem\.bn\.", "bn1."),
    Rule(r"^s(\d)\.pathway0_res(\d+)\.branch1\.", lambda m: _layer(m) + "downsample.0."),
    Rule(r"^s(\d)\.pathway0_res(\d+)\.branch1_bn\.", lambda m: _layer(m) + "downsample.1."),
    Rule(
        r"^s(\d)\.pathway0_res(\d+)\.branch2\.([abc])\.",
        lambda m: _layer(m) + f"conv{_B2[m.group(3)]}.",
    ),
    Rule(
        r"^s(\d)\.pathway0_res(\d+)\.branch2\.([abc])_bn\.",
        lambda m: _layer(m) + f"bn{_B2[m.group(3)]}.",
    ),
    Rule(r"^head\.projection\.", "fc."),
]

#: ResNetBasicStem and the c2d/i3d pathway pooling.
STEM = {
    "conv1_stride": (1, 2, 2),
    "pool1_kernel": (1, 3, 3),
    "pool1_stride": (1, 2, 2),
    "pool2_temporal": 2,
}


def rename(
    state: Mapping[str, Any],
    *,
    instantiation: str = "softmax",
    sub_sample: bool = True,
    pool2_temporal: int = 2,
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """SlowFast keys → ours.

    Args:
        state: the ``model_state``.
        instantiation: ``NONLOCAL.INSTANTIATION`` (``"softmax"`` in every NLN config,
            ``"dot_product"`` the default of the config system).
        sub_sample: ``NONLOCAL.POOL`` of 1×2×2 (the default); False for 1×1×1.
        pool2_temporal: the temporal ``_POOL1`` after res2 (2 for c2d/i3d, 1 for the
            ``*_nopool`` archs).
        meta: unused.
    """
    km = KeyMap(NAME, dict(state))
    if "conv_theta.weight" in state and "bn.weight" in state:
        map_fb_nonlocal(km, "", "", norm="bn", instantiation=instantiation, sub_sample=sub_sample)
        km.refuse_unmapped("a SlowFast Nonlocal block")
        return km
    blocks = sorted(
        {m.group(0) for k in state if (m := re.match(r"^s(\d)\.pathway0_nonlocal(\d+)\.", k))}
    )
    for prefix in blocks:
        m = re.match(r"^s(\d)\.pathway0_nonlocal(\d+)\.", prefix)
        dst = f"layer{int(m.group(1)) - 1}.{m.group(2)}.after."
        map_fb_nonlocal(
            km, prefix, dst, norm="bn", instantiation=instantiation, sub_sample=sub_sample
        )
    km.rename_all(RULES)
    km.refuse_unmapped("a SlowFast single-pathway ResNet")
    km.builder_options.update({**STEM, "pool2_temporal": pool2_temporal})
    km.notes.append(
        "SlowFast's ResNetBasicStem (conv stride 1x2x2, pool 1x3x3 stride 1x2x2) and "
        f"pathway pooling {pool2_temporal}x1x1 after res2"
    )
    return km
