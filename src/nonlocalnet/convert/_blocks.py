"""Key layouts of the peers' attention blocks, mapped onto ours.

Ours (:class:`~nonlocalnet.layers.NonLocalNd`): ``theta``, ``phi``, ``g``, ``conv_out`` (each a
1×1(×1) conv with bias), ``norm`` (BatchNorm after W_z), ``concat_project`` (concatenation's
w_f, no bias). :class:`~nonlocalnet.layers.GlobalContext`: ``conv_mask``, ``transform_add`` and
``transform_mul``, each ``[conv, LayerNorm([C·r, 1, ...]), ReLU, conv]`` (indices 0, 1, 3).

Peers:

* mmcv ``NonLocal2d/3d`` (mmaction2, mmdet, mmseg): ``theta.conv``, ``phi.conv``, ``g.conv``
  (``phi.0.conv``, ``g.0.conv`` when sub-sampling wraps them with the max pooling, which then
  runs *after* φ and g; floor rounding), ``conv_out.conv`` (no bias when a norm follows),
  ``conv_out.bn``, ``concat_project.conv``. Logits scaled by C'^-1/2 (embedded Gaussian, when
  ``use_scale``); dot product and concatenation divide by the number of keys.
* mmcv ``ContextBlock`` (mmdet's and mmseg's GC): ``conv_mask``, ``channel_add_conv.{0,1,3}``,
  ``channel_mul_conv.{0,1,3}``, LayerNorm eps 1e-5: the same layout as ours.
* SlowFast ``Nonlocal``: ``conv_theta``, ``conv_phi``, ``conv_g``, ``conv_out`` (with bias),
  ``bn``; pytorchvideo ``NonLocal``: the same with ``norm``. Both max-pool x *before* φ and g
  (floor rounding); ``softmax`` scales by C'^-1/2, ``dot_product`` divides by the number of keys.
* timm ``NonLocalAttn``: ``t``, ``p``, ``g``, ``z`` (all with bias), ``norm``; no sub-sampling;
  logits scaled by C^-1/2 (C the input width, not C'). timm ``GlobalContext``: ``conv_attn``,
  ``mlp_add.{fc1, norm, fc2}``, ``mlp_scale.{fc1, norm, fc2}`` (``LayerNorm2d`` over channels,
  eps 1e-6); fusion ``'gc'`` = scale (sigmoid) only, ``'gca'`` = add only.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from nonlocalnet.convert._core import ConversionError, KeyMap

__all__ = [
    "map_fb_nonlocal",
    "map_mmcv_context_block",
    "map_mmcv_nonlocal",
    "map_timm_global_context",
    "map_timm_nonlocal",
    "merge_options",
]

PARAMS = ("weight", "bias")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _under(km: KeyMap, prefix: str) -> dict[str, Any]:
    """Source keys under ``prefix`` (without it)."""
    return {k[len(prefix) :]: v for k, v in km.src.items() if k.startswith(prefix)}


def _put_all(km: KeyMap, src: str, dst: str, names: tuple[str, ...] = PARAMS) -> bool:
    """Map ``src.<name>`` → ``dst.<name>`` for each name present; True when any was."""
    found = False
    for n in names:
        if f"{src}.{n}" in km.src:
            km.put(f"{dst}.{n}", km.src[f"{src}.{n}"], f"{src}.{n}")
            found = True
    return found


def merge_options(km: KeyMap, options: dict[str, Any], what: str, kind: str = "nl") -> None:
    """Record block options; every block of a checkpoint must agree."""
    target = km.nl_options if kind == "nl" else km.gc_options
    for key, value in options.items():
        if key == "ratio" and key in target and abs(target[key] - value) < 1e-9:
            continue
        if key in target and target[key] != value:
            raise ConversionError(
                f"{km.source}: {what} has {key}={value!r} but another block has "
                f"{target[key]!r}; one model holds blocks of one kind"
            )
        target[key] = value


def map_mmcv_nonlocal(
    km: KeyMap,
    src: str,
    dst: str,
    *,
    pairwise: str | None,
    use_scale: bool | None,
) -> None:
    """An mmcv ``NonLocal2d/3d`` at source prefix ``src`` (ends with '.') onto ours at ``dst``.

    Args:
        km: the key map.
        src: the source prefix, e.g. ``"backbone.layer2.1.non_local_block."``.
        dst: our prefix, e.g. ``"layer2.1.after."``.
        pairwise: the mode the checkpoint was trained with, when the keys do not say it
            (embedded Gaussian and dot product have the same keys); None raises then.
        use_scale: mmcv's ``use_scale`` (embedded Gaussian only).
    """
    keys = _under(km, src)
    has_theta = any(k.startswith("theta.") for k in keys)
    has_concat = any(k.startswith("concat_project.") for k in keys)
    sub = any(k.startswith("g.0.") for k in keys)
    g = "g.0.conv" if sub else "g.conv"
    phi = "phi.0.conv" if sub else "phi.conv"
    _put_all(km, src + g, dst + "g")
    if has_theta:
        _put_all(km, src + "theta.conv", dst + "theta")
        _put_all(km, src + phi, dst + "phi")
    if has_concat:
        _put_all(km, src + "concat_project.conv", dst + "concat_project", ("weight",))
    _put_all(km, src + "conv_out.conv", dst + "conv_out")
    norm = _put_all(km, src + "conv_out.bn", dst + "norm", BN_KEYS)
    if norm and f"{src}conv_out.conv.bias" not in km.src:
        km.zero_bias.append(_escape(dst) + r"conv_out\.bias$")
    if not has_theta:
        mode = "gaussian"
    elif has_concat:
        mode = "concatenation"
    elif pairwise is None:
        raise ConversionError(
            f"{km.source}: the non-local blocks ({src}...) have θ/φ convs, which the embedded "
            "Gaussian and the dot product share; pass pairwise='embedded_gaussian' or "
            "pairwise='dot_product' (the mode of the checkpoint's config)"
        )
    else:
        mode = pairwise
    opts: dict[str, Any] = {
        "pairwise": mode,
        "sub_sample": sub,
        "norm": norm,
    }
    if sub:
        opts["sub_sample_position"] = "after"
        opts["sub_sample_rounding"] = "floor"
    if mode == "embedded_gaussian":
        opts["use_scale"] = bool(use_scale)
    elif mode == "gaussian":
        opts["use_scale"] = False
    merge_options(km, opts, src.rstrip("."))


def map_mmcv_context_block(km: KeyMap, src: str, dst: str) -> None:
    """An mmcv ``ContextBlock`` (the official GCNet layout) onto our GlobalContext."""
    keys = _under(km, src)
    pooling = "att" if "conv_mask.weight" in keys else "avg"
    if pooling == "att":
        _put_all(km, src + "conv_mask", dst + "conv_mask")
    fusion = []
    layer_norm = None
    for theirs, ours, kind in (
        ("channel_mul_conv", "transform_mul", "mul"),
        ("channel_add_conv", "transform_add", "add"),
    ):
        if f"{theirs}.0.weight" not in keys:
            continue
        fusion.append(kind)
        _put_all(km, f"{src}{theirs}.0", f"{dst}{ours}.0")
        ln = _put_all(km, f"{src}{theirs}.1", f"{dst}{ours}.1")
        _put_all(km, f"{src}{theirs}.3", f"{dst}{ours}.3")
        layer_norm = ln if layer_norm is None else layer_norm and ln
    if not fusion:
        raise ConversionError(f"{km.source}: context block {src}... has no channel_add/mul_conv")
    channels = int(
        km.src[
            f"{src}{'channel_add_conv' if 'add' in fusion else 'channel_mul_conv'}.0.weight"
        ].shape[1]
    )
    planes = int(
        km.src[
            f"{src}{'channel_add_conv' if 'add' in fusion else 'channel_mul_conv'}.0.weight"
        ].shape[0]
    )
    merge_options(
        km,
        {
            "pooling": pooling,
            "fusion": tuple(fusion),
            "layer_norm": bool(layer_norm),
            "ratio": ratio_for(channels, planes),
        },
        src.rstrip("."),
        "gc",
    )


def ratio_for(channels: int, planes: int) -> float:
    """A ratio r with ``int(channels * r) == planes`` (planes/channels when that holds)."""
    r = planes / channels
    if int(channels * r) != planes:
        r = (planes + 0.5) / channels
    return r


def map_fb_nonlocal(
    km: KeyMap, src: str, dst: str, *, norm: str, instantiation: str, sub_sample: bool
) -> None:
    """A SlowFast / pytorchvideo non-local block (``conv_theta`` ... ``norm``/``bn``) onto ours.

    Args:
        km: the key map.
        src: source prefix (ends with '.').
        dst: our prefix.
        norm: the norm's name there (``"bn"`` SlowFast, ``"norm"`` pytorchvideo).
        instantiation: ``"softmax"`` (embedded Gaussian scaled by C'^-1/2) or
            ``"dot_product"``.
        sub_sample: the block max-pools x before φ and g (``pool_size`` 1×2×2).
    """
    for theirs, ours in (("conv_theta", "theta"), ("conv_phi", "phi"), ("conv_g", "g")):
        _put_all(km, src + theirs, dst + ours)
    _put_all(km, src + "conv_out", dst + "conv_out")
    has_norm = _put_all(km, src + norm, dst + "norm", BN_KEYS)
    if instantiation not in ("softmax", "dot_product"):
        raise ConversionError(
            f"{km.source}: unknown non-local instantiation {instantiation!r}; expected "
            "'softmax' or 'dot_product'"
        )
    opts: dict[str, Any] = {
        "pairwise": "embedded_gaussian" if instantiation == "softmax" else "dot_product",
        "sub_sample": sub_sample,
        "norm": has_norm,
    }
    if instantiation == "softmax":
        opts["use_scale"] = True
    if sub_sample:
        opts["sub_sample_position"] = "before"
        opts["sub_sample_rounding"] = "floor"
    merge_options(km, opts, src.rstrip("."))


def map_timm_nonlocal(km: KeyMap, src: str, dst: str, *, use_scale: bool = True) -> None:
    """timm's ``NonLocalAttn`` onto ours.

    timm scales the logits by C^-1/2 (C the input width); ours by C'^-1/2. With
    ``use_scale`` the θ projection (weight and bias) is multiplied by √(C'/C), so that
    θ'ᵀφ · C'^-1/2 = θᵀφ · C^-1/2; without, the scale is 1 in both.
    """
    t = km.src[f"{src}t.weight"]
    inner, channels = int(t.shape[0]), int(t.shape[1])
    factor = math.sqrt(inner / channels) if use_scale else 1.0
    for n in PARAMS:
        key = f"{src}t.{n}"
        if key in km.src:
            value = torch.as_tensor(km.src[key])
            km.put(f"{dst}theta.{n}", (value.double() * factor).to(value.dtype), key)
    for theirs, ours in (("p", "phi"), ("g", "g"), ("z", "conv_out")):
        _put_all(km, src + theirs, dst + ours)
    has_norm = _put_all(km, src + "norm", dst + "norm", BN_KEYS)
    merge_options(
        km,
        {
            "pairwise": "embedded_gaussian",
            "use_scale": use_scale,
            "sub_sample": False,
            "norm": has_norm,
        },
        src.rstrip(".") or "NonLocalAttn",
    )
    if use_scale and factor != 1.0:
        note = (
            f"timm NonLocalAttn scales logits by C^-1/2 (C = {channels}); θ multiplied by "
            f"sqrt(C'/C) = {factor:.6g} so that ours (C'^-1/2, C' = {inner}) computes the same"
        )
        if note not in km.notes:
            km.notes.append(note)


def map_timm_global_context(km: KeyMap, src: str, dst: str) -> None:
    """timm's ``GlobalContext`` onto ours (``LayerNorm2d`` weights reshaped to (C·r, 1, 1))."""
    keys = _under(km, src)
    pooling = "att" if "conv_attn.weight" in keys else "avg"
    if pooling == "att":
        _put_all(km, src + "conv_attn", dst + "conv_mask")
    fusion, layer_norm = [], True
    for theirs, ours, kind in (
        ("mlp_scale", "transform_mul", "mul"),
        ("mlp_add", "transform_add", "add"),
    ):
        if f"{theirs}.fc1.weight" not in keys:
            continue
        fusion.append(kind)
        _put_all(km, f"{src}{theirs}.fc1", f"{dst}{ours}.0")
        _put_all(km, f"{src}{theirs}.fc2", f"{dst}{ours}.3")
        found = False
        for n in PARAMS:
            key = f"{src}{theirs}.norm.{n}"
            if key in km.src:
                v = torch.as_tensor(km.src[key])
                km.put(f"{dst}{ours}.1.{n}", v.reshape(-1, 1, 1), key)  # (C·r,) -> (C·r, 1, 1)
                found = True
        layer_norm = layer_norm and found
    if not fusion:
        raise ConversionError(f"{km.source}: GlobalContext {src}... has no mlp_add/mlp_scale")
    fc1 = km.src[f"{src}{'mlp_add' if 'add' in fusion else 'mlp_scale'}.fc1.weight"]
    merge_options(
        km,
        {
            "pooling": pooling,
            "fusion": tuple(fusion),
            "layer_norm": layer_norm,
            "ratio": ratio_for(int(fc1.shape[1]), int(fc1.shape[0])),
        },
        src.rstrip(".") or "GlobalContext",
        "gc",
    )
    if layer_norm:
        km.gc_options["norm_eps"] = 1e-6


def _escape(prefix: str) -> str:
    return "^" + re.escape(prefix)
