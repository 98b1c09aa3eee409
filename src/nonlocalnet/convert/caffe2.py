"""The official Caffe2 video-nonlocal-net checkpoints (Wang et al.'s ``c2_model_iter*.pkl``).

A checkpoint is a Python 2 pickle (read with latin-1) of a dict whose ``blobs`` (or the dict
itself) holds numpy arrays named by the Caffe2 net, plus ``*_momentum`` (SGD state),
``model_iter`` and ``lr``, which are ignored. Names (``lib/models/resnet_video_org.py``,
``resnet_helper.py``, ``nonlocal_helper.py``):

============================================  =================================================
``conv1_w``                                   ``conv1.weight`` (64, 3, T, 7, 7), no bias
``res_conv1_bn_{s,b,rm,riv}``                 ``bn1.{weight,bias,running_mean,running_var}``
``res{k}_{i}_branch2{a,b,c}_w``               ``layer{k-1}.{i}.conv{1,2,3}.weight``
``res{k}_{i}_branch2{a,b,c}_bn_*``            ``layer{k-1}.{i}.bn{1,2,3}.*``
``res{k}_0_branch1_w`` (+ ``_bn_*``)          ``layer{k-1}.0.downsample.{0,1}.*``
``nonlocal_conv{k}_{i}_{theta,phi,g,out}_*``  ``layer{k-1}.{i}.after.{theta,phi,g,conv_out}.*``
``nonlocal_conv{k}_{i}_bn_*``                 ``layer{k-1}.{i}.after.norm.*``
``pred_{w,b}``                                ``fc.{weight,bias}``
============================================  =================================================

``_s``/``_b`` are Caffe2's SpatialBN scale and shift, ``_rm``/``_riv`` its running mean and
running *variance* (the name notwithstanding: SpatialBN's test mode divides by
sqrt(riv + eps)). Models trained with ``USE_AFFINE`` store ``_s``/``_b`` only (AffineNd):
those become BatchNorms with mean 0 and variance 1 - eps. The BN eps is 1.0000001e-5
(``BN_EPSILON``), folded exactly into the running variances. The NL block (``spacetime_nonlocal``)
max-pools x 1×2×2 *before* φ and g (``USE_MAXPOOL``, Caffe2's floor rounding), scales the
logits by C'^-1/2 (``USE_SCALE``) before the softmax (``USE_SOFTMAX``; without it, the dot
product divided by the number of keys), and its out conv has a bias although BN follows.

The blocks are placed as the official nets do (``nonlocal_mod``): after res3 blocks 1, 3 and
res4 blocks 1, 3, 5 (R50) or 6, 13, 20 (R101). The stem differs between the nets:
``resnet_video_org`` (the 32×2 models of the paper's tables: conv1 temporal stride 2, pool1
2×3×3 stride 2) and ``resnet_video`` (the 8-frame models: conv1 temporal stride 1, pool1
1×3×3 stride 1×2×2); both pool1s pad 0 spatially (112 → 55 at 224, where torchvision's pads 1:
112 → 56), so the converted model is built with ``pool1_padding=(0, 0, 0)`` and computes the
official net end to end.

The reader never executes code: :class:`RestrictedUnpickler` resolves only numpy's array
reconstruction, ``numpy.dtype`` and numpy scalars; any other global is refused.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nonlocalnet.convert._core import ConversionError, KeyMap, Rule

__all__ = ["BN_EPSILON", "RestrictedUnpickler", "load_pickle", "rename"]

NAME = "caffe2"
DESCRIPTION = "official Caffe2 video-nonlocal-net pickles (C2D / I3D / NL, R50 / R101)"

#: the official ``MODEL.BN_EPSILON`` and ``NONLOCAL.BN_EPSILON``.
BN_EPSILON = 1.0000001e-5

#: blobs that are not weights.
_BOOKKEEPING = ("model_iter", "lr")

_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_PARAM = {"w": "weight", "b": "bias"}
_BRANCH2 = {"a": "1", "b": "2", "c": "3"}
_NL = {"theta": "theta", "phi": "phi", "g": "g", "out": "conv_out"}

RULES = [
    Rule(r"^conv1_w$", "conv1.weight"),
    Rule(r"^res_conv1_bn_(s|b|rm|riv)$", lambda m: f"bn1.{_BN[m.group(1)]}"),
    Rule(
        r"^res(\d)_(\d+)_branch2([abc])_w$",
        lambda m: f"layer{int(m.group(1)) - 1}.{m.group(2)}.conv{_BRANCH2[m.group(3)]}.weight",
    ),
    Rule(
        r"^res(\d)_(\d+)_branch2([abc])_bn_(s|b|rm|riv)$",
        lambda m: (
            f"layer{int(m.group(1)) - 1}.{m.group(2)}.bn{_BRANCH2[m.group(3)]}." + _BN[m.group(4)]
        ),
    ),
    Rule(
        r"^res(\d)_(\d+)_branch1_w$",
        lambda m: f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.0.weight",
    ),
    Rule(
        r"^res(\d)_(\d+)_branch1_bn_(s|b|rm|riv)$",
        lambda m: f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.{_BN[m.group(3)]}",
    ),
    Rule(
        r"^nonlocal_conv(\d)_(\d+)_(theta|phi|g|out)_(w|b)$",
        lambda m: (
            f"layer{int(m.group(1)) - 1}.{m.group(2)}.after.{_NL[m.group(3)]}." + _PARAM[m.group(4)]
        ),
    ),
    Rule(
        r"^nonlocal_conv(\d)_(\d+)_bn_(s|b|rm|riv)$",
        lambda m: f"layer{int(m.group(1)) - 1}.{m.group(2)}.after.norm.{_BN[m.group(3)]}",
    ),
    Rule(r"^pred_(w|b)$", lambda m: f"fc.{_PARAM[m.group(1)]}"),
]

#: the two nets' stems: (conv1 stride, pool1 kernel, pool1 stride).
VARIANTS = {
    "32x2": {"conv1_stride": (2, 2, 2), "pool1_kernel": (2, 3, 3), "pool1_stride": (2, 2, 2)},
    "8x8": {"conv1_stride": (1, 2, 2), "pool1_kernel": (1, 3, 3), "pool1_stride": (1, 2, 2)},
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global the restricted unpickler does not resolve."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for pickles of numpy arrays that resolves no other global.

    Allowed: numpy's ``_reconstruct`` (``numpy.core`` or ``numpy._core``), ``numpy.ndarray``,
    ``numpy.dtype``, numpy's ``scalar``, ``collections.OrderedDict``, and ``_codecs.encode``
    with a latin-1 codec (Python 3 protocol-2 pickles of bytes). Anything else raises
    ``pickle.UnpicklingError`` before it is called, so a pickle that would run code never does.
    """

    def find_class(self, module: str, name: str) -> Any:
        import collections

        import numpy as np

        core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
        allowed: dict[tuple[str, str], Any] = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("_codecs", "encode"): _latin1_encode,
        }
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = core.multiarray._reconstruct
            allowed[(mod, "scalar")] = core.multiarray.scalar
        try:
            return allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(
                f"refusing to load global {module}.{name}: a Caffe2 checkpoint holds numpy "
                "arrays only"
            ) from None


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise RefusedGlobal(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


def load_pickle(path: str | Path | bytes) -> dict[str, Any]:
    """Read a Caffe2 checkpoint pickle without executing code.

    Args:
        path: the ``.pkl`` file, or its bytes.

    Returns:
        The blobs (name → numpy array or scalar), ``blobs`` unwrapped when present.

    Raises:
        ConversionError: not a readable pickle (truncated, another format) or one that
            references anything but numpy arrays.
    """
    where = "<bytes>" if isinstance(path, bytes) else str(path)
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedGlobal as err:
        raise ConversionError(f"{where}: not a safe Caffe2 pickle: {err}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
    ) as err:
        raise ConversionError(
            f"{where}: cannot read the Caffe2 pickle (truncated or not a pickle?): "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{where}: a Caffe2 checkpoint is a dict of blobs, got {type(obj).__name__}"
        )
    blobs = obj.get("blobs", obj)
    if not isinstance(blobs, Mapping):
        raise ConversionError(f"{where}: 'blobs' is a {type(blobs).__name__}, not a dict")
    return {str(k): v for k, v in blobs.items()}


def rename(
    state: Mapping[str, Any],
    *,
    pairwise: str = "embedded_gaussian",
    use_scale: bool = True,
    variant: str = "32x2",
    meta: Mapping[str, Any] | None = None,
) -> KeyMap:
    """Caffe2 blob names → ours.

    Args:
        state: the blobs.
        pairwise: ``"embedded_gaussian"`` (``NONLOCAL.USE_SOFTMAX``, every published model) or
            ``"dot_product"``.
        use_scale: ``NONLOCAL.USE_SCALE`` (logits × C'^-1/2; on in every published model).
        variant: ``"32x2"`` (``resnet_video_org``: conv1 and pool1 with temporal stride 2, the
            paper's 32-frame models) or ``"8x8"`` (``resnet_video``, the 8-frame models).
        meta: unused (Caffe2 checkpoints carry no config).
    """
    if variant not in VARIANTS:
        raise ConversionError(
            f"caffe2: unknown variant {variant!r}; expected one of {list(VARIANTS)}"
        )
    if pairwise not in ("embedded_gaussian", "dot_product"):
        raise ConversionError(
            f"caffe2: pairwise must be 'embedded_gaussian' (USE_SOFTMAX) or 'dot_product', got "
            f"{pairwise!r}"
        )
    km = KeyMap(NAME, dict(state))
    for key in state:
        if key.endswith("_momentum"):
            km.ignore(key, "SGD momentum (*_momentum)")
        elif key in _BOOKKEEPING:
            km.ignore(key, "training bookkeeping (model_iter, lr)")
    km.rename_all(RULES)
    km.refuse_unmapped("the Caffe2 ResNet / NL nets")
    km.bn_eps = BN_EPSILON

    # pred as a 1x1x1 conv (the test net): (K, C, 1, 1, 1) -> (K, C)
    fc = km.out.get("fc.weight")
    if fc is not None and fc.dim() > 2:
        km.out["fc.weight"] = fc.reshape(fc.shape[0], -1)

    # affine-only norms (USE_AFFINE / NONLOCAL.USE_AFFINE): scale and shift, no statistics
    norms = [k[: -len(".weight")] for k in km.out if k.endswith(".weight") and _is_norm(k)]
    affine = {
        p for p in norms if f"{p}.running_mean" not in km.out and f"{p}.running_var" not in km.out
    }
    for group in ("backbone", "non-local"):
        members = {p for p in norms if (".after." in p) == (group == "non-local")}
        some = affine & members
        if some and some != members:
            raise ConversionError(
                f"caffe2: {len(some)} of the {len(members)} {group} norms have no running "
                f"statistics (_rm, _riv): {sorted(some)[:4]}...; a net is affine-only "
                "(USE_AFFINE) everywhere or nowhere"
            )
    km.affine_only = affine
    if km.affine_only:
        km.notes.append(
            f"{len(km.affine_only)} affine-only norm(s) (AffineNd, USE_AFFINE): BatchNorms "
            "with mean 0 and variance 1 - eps"
        )

    nl = sorted({k.split(".after.")[0] for k in km.out if ".after." in k})
    if nl:
        km.nl_options.update(
            {
                "pairwise": pairwise,
                "sub_sample": True,
                "sub_sample_position": "before",
                "sub_sample_rounding": "floor",
            }
        )
        if pairwise == "embedded_gaussian":
            km.nl_options["use_scale"] = use_scale
        for block in nl:
            km.fold_bias[f"{block}.after.conv_out.bias"] = f"{block}.after.norm"
            for conv in ("theta", "phi", "g", "conv_out"):
                km.zero_bias.append(rf"^{re.escape(block)}\.after\.{conv}\.bias$")
        if any(k.startswith("layer2.") and k.endswith(".after.norm.weight") for k in km.out) and (
            km.affine_only & {f"{b}.after.norm" for b in nl}
        ):
            km.inexact.append(
                "the affine (I3D-pretrained) official models compute res3's NL blocks within "
                "groups of 4 frames (res_stage_nonlocal_group); ours attend over all frames"
            )
    if "conv1.weight" in km.out and km.out["conv1.weight"].dim() == 5:
        km.builder_options.update(VARIANTS[variant])
        km.notes.append(
            f"stem of the {'resnet_video_org (32x2)' if variant == '32x2' else 'resnet_video (8x8)'} "
            f"net: conv1 stride {VARIANTS[variant]['conv1_stride']}, pool1 "
            f"{VARIANTS[variant]['pool1_kernel']} stride {VARIANTS[variant]['pool1_stride']}"
        )
        km.builder_options["pool1_padding"] = (0, 0, 0)
        km.notes.append(
            "the official pool1 pads 0 (a 112x112 map becomes 55x55, not 56x56): "
            "pool1_padding=(0, 0, 0)"
        )
    return km


def _is_norm(key: str) -> bool:
    return bool(re.search(r"(^bn1|\.bn\d|\.downsample\.1|\.after\.norm)\.weight$", key))
