"""mmaction2 recognizers: ``ResNet3d`` backbones (I3D, NL-I3D) with an ``I3DHead``.

Keys (``mmaction/models/backbones/resnet3d.py``): every conv is an mmcv ``ConvModule``, so
``backbone.conv1.{conv,bn}`` is our ``conv1``/``bn1``, ``backbone.layerN.i.conv{1,2,3}.{conv,bn}``
our ``layerN.i.{conv,bn}{1,2,3}``, ``downsample.{conv,bn}`` our ``downsample.{0,1}``;
``cls_head.fc_cls`` is ``fc``. A block with ``non_local`` ends with
``backbone.layerN.i.non_local_block`` (an mmcv ``NonLocal3d`` run on the block's output, after
the residual addition): our ``layerN.i.after``. ``phi.0.conv``/``g.0.conv`` exist because
sub-sampling wraps φ and g with a 1×2×2 max pooling *after* the convs (floor rounding).

The I3D configs: conv1 5×7×7 with temporal stride 2 (``conv1_stride_t``), pool1 1×3×3 with
stride 2×2×2 (``pool1_stride_t``), pool2 2×1×1 after res2 (``with_pool2``), 3×1×1 inflation of
the official pattern. The NL configs: ``non_local=((0,0,0), (0,1,0,1), (0,1,0,1,0,1), (0,0,0))``
(res3 blocks 1, 3, res4 blocks 1, 3, 5) with ``sub_sample=True, use_scale=False`` and ``mode``
``dot_product``, ``embedded_gaussian`` or ``gaussian``. The weights do not tell the dot product
from the embedded Gaussian: the mode comes from the checkpoint's stored config when it has one
(mmengine's ``meta['cfg']``), else it must be given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_mmcv_nonlocal
from nonlocalnet.convert._core import KeyMap, Rule
from nonlocalnet.convert.mmcv import map_standalone

__all__ = ["config_options", "rename"]

NAME = "mmaction2"
DESCRIPTION = "mmaction2 ResNet3d recognizers: I3D / NL-I3D (+ I3DHead)"

_CM = {"conv": "conv", "bn": "bn"}

RULES = [
    Rule(r"^backbone\.conv1\.conv\.", "conv1."),
    Rule(r"^backbone\.conv1\.bn\.", "bn1."),
    Rule(r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.conv\.", r"layer\1.\2.conv\3."),
    Rule(r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.bn\.", r"layer\1.\2.bn\3."),
    Rule(r"^backbone\.layer(\d)\.(\d+)\.downsample\.conv\.", r"layer\1.\2.downsample.0."),
    Rule(r"^backbone\.layer(\d)\.(\d+)\.downsample\.bn\.", r"layer\1.\2.downsample.1."),
    Rule(r"^cls_head\.fc_cls\.", "fc."),
]


def config_options(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``mode`` and ``use_scale`` of ``non_local_cfg`` in an mmengine checkpoint's stored config."""
    text = (meta or {}).get("cfg") if isinstance(meta, Mapping) else None
    if not isinstance(text, str):
        return {}
    m = re.search(r"non_local_cfg\s*=\s*dict\(", text)
    if m is None:
        return {}
    depth, end = 1, m.end()
    while end < len(text) and depth:  # the matching parenthesis of dict(
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    body = text[m.end() : end]
    out: dict[str, Any] = {}
    mode = re.search(r"mode\s*=\s*['\"](\w+)['\"]", body)
    if mode:
        out["pairwise"] = mode.group(1)
    scale = re.search(r"use_scale\s*=\s*(True|False)", body)
    if scale:
        out["use_scale"] = scale.group(1) == "True"
    return out


def rename(
    state: Mapping[str, Any],
    *,
    pairwise: str | None = None,
    use_scale: bool | None = None,
    conv1_stride_t: int = 2,
    pool1_stride_t: int = 2,
    with_pool2: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """mmaction2 keys → ours.

    Args:
        state: the recognizer's state_dict (``backbone.``, ``cls_head.``).
        pairwise: ``non_local_cfg['mode']`` (``"dot_product"``, ``"embedded_gaussian"``);
            read from ``meta`` when the checkpoint stores its config, required otherwise
            when the blocks have θ/φ.
        use_scale: ``non_local_cfg['use_scale']``; the configs' False when not stored.
        conv1_stride_t: ``ResNet3d(conv1_stride_t=...)`` (2 in the I3D configs).
        pool1_stride_t: ``ResNet3d(pool1_stride_t=...)`` (2 in the I3D configs).
        with_pool2: ``ResNet3d(with_pool2=...)`` (True).
        meta: the checkpoint's ``meta`` (mmengine), for the stored config.
    """
    stored = config_options(meta)
    km = KeyMap(NAME, dict(state))
    if pairwise is None and "pairwise" in stored:
        pairwise = stored["pairwise"]
        km.notes.append(f"non-local mode {pairwise!r} from the checkpoint's stored config")
    if use_scale is None:
        use_scale = stored.get("use_scale", False)
    if map_standalone(km, pairwise=pairwise, use_scale=use_scale):
        km.refuse_unmapped("an mmcv block")
        return km
    for key in state:
        if key.startswith("data_preprocessor."):
            km.ignore(key, "input normalisation of mmaction2's data preprocessor")
    nl = sorted(
        {
            m.group(0)
            for k in state
            if (m := re.match(r"^backbone\.layer\d\.\d+\.non_local_block\.", k))
        }
    )
    for prefix in nl:
        dst = prefix[len("backbone.") : -len("non_local_block.")] + "after."
        map_mmcv_nonlocal(km, prefix, dst, pairwise=pairwise, use_scale=use_scale)
    km.rename_all(RULES)
    km.refuse_unmapped("an mmaction2 ResNet3d recognizer")
    km.builder_options.update(
        {
            "conv1_stride": (conv1_stride_t, 2, 2),
            "pool1_kernel": (1, 3, 3),
            "pool1_stride": (pool1_stride_t, 2, 2),
            "pool2_temporal": 2 if with_pool2 else 1,
        }
    )
    km.notes.append(
        f"stem of mmaction2's I3D configs: conv1 stride ({conv1_stride_t}, 2, 2), pool1 1x3x3 "
        f"stride ({pool1_stride_t}, 2, 2), pool2 {'2x1x1' if with_pool2 else 'off'}"
    )
    return km
