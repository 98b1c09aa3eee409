"""mmseg segmentors: a dilated ResNet (``ResNetV1b`` stem) with ANN / NL / GC heads.

Backbone (``backbone.``): mmseg's ``ResNet`` has torchvision's keys; ``ResNetV1c`` (its
``*-d8`` configs) replaces the 7×7 ``conv1``/``bn1`` by a deep stem ``backbone.stem.{0..8}``:
conv 3→32 (3×3, stride 2) ``stem.0``, BN ``stem.1``, ReLU, conv 32→32 ``stem.3``, BN
``stem.4``, ReLU, conv 32→64 ``stem.6``, BN ``stem.7``, ReLU (bias-free convs, padding 1), then
the 3×3 max pooling: ``create_segmentation_model(deep_stem=True)``, whose backbone has the same
keys; the converter sets it.
The dilations (1, 1, 2, 4) with ``contract_dilation`` are torchvision's
``replace_stride_with_dilation=(False, True, True)``: the same weights.

Heads:

* ``ANNHead`` → our ANNHead: ``fusion.stages.0.{key,query}_project`` (ConvModule: conv without
  bias, BN, ReLU) → ``fusion.f_{key,query}.{0,1}``, ``value_project`` → ``f_value``,
  ``out_project`` → ``conv_out``, ``fusion.bottleneck`` → ``fusion.fusion.{0,1}``;
  ``bottleneck`` → ``conv.{0,1}``; ``context`` (APNB, shared query/key projection) likewise;
  ``conv_seg`` → ``classifier``. mmseg scales by d^-1/2 with d the projection width, as ours.
* ``NLHead`` / ``GCHead`` → our BlockHead: ``convs.0`` → ``conv_in``, ``nl_block`` /
  ``gc_block`` → ``block``, ``convs.1`` → ``conv_out``, ``conv_seg`` → ``classifier``; mmseg's
  default ``concat_input=True`` (every published NL / GC model) adds ``conv_cat`` (3×3 conv,
  BN, ReLU of [x, out]) → ``conv_cat.{0,1}`` of a head built with ``concat_input=True`` (the
  converter sets it).
* ``FCNHead`` with one conv and ``concat_input=False`` (the auxiliary head): ``convs.0`` →
  ``conv``, ``conv_seg`` → ``classifier``; our FCN heads have no ``conv_cat``, so an FCN head
  with ``concat_input=True`` is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nonlocalnet.convert._blocks import map_mmcv_context_block, map_mmcv_nonlocal
from nonlocalnet.convert._core import ConversionError, KeyMap, Rule
from nonlocalnet.convert.mmcv import map_standalone

__all__ = ["DEEP_STEM", "rename"]

NAME = "mmseg"
DESCRIPTION = "mmseg dilated ResNetV1b + ANNHead / NLHead / GCHead / FCNHead (aux)"

#: ResNetV1c's deep stem: module → (kind, shape) for 64 stem channels.
DEEP_STEM = {
    "stem.0": ("Conv2d(3, 32, 3, stride=2, padding=1, bias=False)", (32, 3, 3, 3)),
    "stem.1": ("BatchNorm2d(32)", (32,)),
    "stem.2": ("ReLU", ()),
    "stem.3": ("Conv2d(32, 32, 3, padding=1, bias=False)", (32, 32, 3, 3)),
    "stem.4": ("BatchNorm2d(32)", (32,)),
    "stem.5": ("ReLU", ()),
    "stem.6": ("Conv2d(32, 64, 3, padding=1, bias=False)", (64, 32, 3, 3)),
    "stem.7": ("BatchNorm2d(64)", (64,)),
    "stem.8": ("ReLU", ()),
}

_CM = {"conv": "0", "bn": "1"}  # ConvModule children -> our conv_bn_relu indices

RULES = [
    Rule(r"^backbone\.(conv1|bn1)\.", r"backbone.\1."),
    Rule(r"^backbone\.stem\.(\d)\.", r"backbone.stem.\1."),
    Rule(
        r"^backbone\.layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.",
        r"backbone.layer\1.\2.\3.",
    ),
    # ANN
    Rule(
        r"^decode_head\.(fusion|context)\.stages\.0\.(key|query)_project\.(conv|bn)\.",
        lambda m: f"head.{m.group(1)}.f_{m.group(2)}.{_CM[m.group(3)]}.",
    ),
    Rule(r"^decode_head\.(fusion|context)\.stages\.0\.value_project\.", r"head.\1.f_value."),
    Rule(r"^decode_head\.(fusion|context)\.stages\.0\.out_project\.", r"head.\1.conv_out."),
    Rule(
        r"^decode_head\.(fusion|context)\.bottleneck\.(conv|bn)\.",
        lambda m: f"head.{m.group(1)}.fusion.{_CM[m.group(2)]}.",
    ),
    Rule(r"^decode_head\.bottleneck\.(conv|bn)\.", lambda m: f"head.conv.{_CM[m.group(1)]}."),
    # NL / GC heads (their blocks are mapped before) and FCN
    Rule(r"^decode_head\.conv_seg\.", "head.classifier."),
    Rule(
        r"^(decode_head|auxiliary_head)\.conv_cat\.(conv|bn)\.",
        lambda m: (
            f"{'head' if m.group(1) == 'decode_head' else 'aux_head'}.conv_cat.{_CM[m.group(2)]}."
        ),
    ),
    Rule(r"^auxiliary_head\.convs\.0\.(conv|bn)\.", lambda m: f"aux_head.conv.{_CM[m.group(1)]}."),
    Rule(r"^auxiliary_head\.conv_seg\.", "aux_head.classifier."),
]

#: our bias slots where mmseg's ConvModule (a norm follows) has none.
ZERO_BIAS = [r"^head\.(fusion|context)\.(f_key|f_query|fusion)\.0\.bias$"]


def rename(
    state: Mapping[str, Any],
    *,
    pairwise: str = "embedded_gaussian",
    use_scale: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """mmseg keys → our segmentation model (``backbone.``, ``head.``, ``aux_head.``).

    Args:
        state: the segmentor's state_dict (or a standalone mmcv block's).
        pairwise: ``NLHead(mode=...)`` when the keys do not say it (mmseg's default
            ``"embedded_gaussian"``).
        use_scale: ``NLHead(use_scale=...)`` (default True).
        meta: unused.
    """
    km = KeyMap(NAME, dict(state))
    if map_standalone(km, pairwise=pairwise, use_scale=use_scale):
        km.refuse_unmapped("an mmcv block")
        return km
    for key in state:
        if key.startswith("data_preprocessor."):
            km.ignore(key, "input normalisation of mmseg's data preprocessor (mean/std)")
    if "backbone.stem.0.weight" in state:
        km.notes.append("ResNetV1c deep stem (backbone.stem.*): deep_stem=True")
        km.builder_options["deep_stem"] = True
        km.requires.append(
            (
                "backbone.stem.0.weight",
                "mmseg ResNetV1c deep stem (backbone.stem.0/1/3/4/6/7: conv 3->32 3x3 s2, BN, "
                "conv 32->32, BN, conv 32->64, BN, each with ReLU): the given model's backbone "
                "has conv1/bn1; build it with create_segmentation_model(deep_stem=True)",
            )
        )
    heads = {
        "nl": "decode_head.nl_block.",
        "gc": "decode_head.gc_block.",
    }
    for kind, prefix in heads.items():
        if any(k.startswith(prefix) for k in state):
            if kind == "nl":
                map_mmcv_nonlocal(km, prefix, "head.block.", pairwise=pairwise, use_scale=use_scale)
            else:
                map_mmcv_context_block(km, prefix, "head.block.")
            km.rename_all(
                [
                    Rule(
                        r"^decode_head\.convs\.0\.(conv|bn)\.",
                        lambda m: f"head.conv_in.{_CM[m.group(1)]}.",
                    ),
                    Rule(
                        r"^decode_head\.convs\.1\.(conv|bn)\.",
                        lambda m: f"head.conv_out.{_CM[m.group(1)]}.",
                    ),
                ]
            )
    if not any(
        k.startswith(("decode_head.nl_block.", "decode_head.gc_block.", "decode_head.fusion."))
        for k in state
    ):
        convs = {
            int(m.group(1)) for k in state if (m := re.match(r"^decode_head\.convs\.(\d+)\.", k))
        }
        if convs and convs != {0}:
            raise ConversionError(
                f"mmseg: an FCNHead with {len(convs)} convs; our FCN head has one (3x3 conv, BN, "
                "ReLU, classifier)"
            )
        km.rename_all(
            [
                Rule(
                    r"^decode_head\.convs\.0\.(conv|bn)\.",
                    lambda m: f"head.conv.{_CM[m.group(1)]}.",
                )
            ]
        )
    km.rename_all(RULES)
    km.refuse_unmapped("an mmseg ResNet + ANN/NL/GC/FCN head")
    km.zero_bias.extend(ZERO_BIAS)
    block_head = any(k.startswith("head.block.") for k in km.out)
    if block_head and any(k.startswith("head.conv_cat.") for k in km.out):
        km.builder_options["concat_input"] = True
        km.notes.append("decode head with concat_input=True (conv_cat): concat_input=True")
        km.requires.append(
            (
                "head.conv_cat.0.weight",
                "mmseg decode_head has concat_input=True (conv_cat: a 3x3 conv of [input, "
                "output] before the classifier); build the given model with "
                "create_segmentation_model(concat_input=True)",
            )
        )
    for prefix, where in (
        ("head.conv_cat.", "decode_head"),
        ("aux_head.conv_cat.", "auxiliary_head"),
    ):
        if any(k.startswith(prefix) for k in km.out) and not (
            block_head and where == "decode_head"
        ):
            km.requires.append(
                (
                    prefix + "0.weight",
                    f"mmseg {where} is an FCNHead with concat_input=True (conv_cat: a 3x3 conv "
                    "of [input, output] before the classifier); our FCN heads have no input "
                    "concatenation",
                )
            )
    return km
