"""``convert_state_dict``: rename a checkpoint of another implementation, check it, report.

See :mod:`nonlocalnet.convert` for the overview and each source's module for its key layout.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from nonlocalnet.convert._core import (
    ConversionError,
    ConversionReport,
    KeyMap,
    as_conversion_error,
    check_block_options,
    finalize,
    split_supported,
)
from nonlocalnet.models import weights

__all__ = ["SOURCES", "Conversion", "convert_state_dict", "get_converter", "unwrap_state"]

logger = logging.getLogger(__name__)

#: source name → module (each has ``rename(state, **options) -> KeyMap``).
SOURCES: dict[str, str] = {
    "caffe2": "nonlocalnet.convert.caffe2",
    "slowfast": "nonlocalnet.convert.slowfast",
    "pytorchvideo": "nonlocalnet.convert.pytorchvideo",
    "mmaction2": "nonlocalnet.convert.mmaction2",
    "mmdet": "nonlocalnet.convert.mmdet",
    "mmseg": "nonlocalnet.convert.mmseg",
    "mmcv": "nonlocalnet.convert.mmcv",
    "timm": "nonlocalnet.convert.timm",
    "torchvision": "nonlocalnet.convert.torchvision",
}


def get_converter(source: str) -> Any:
    """The module converting ``source``.

    Raises:
        ValueError: an unknown source (the message lists the known ones).
    """
    if source not in SOURCES:
        raise ValueError(
            f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCES)}"
        )
    return importlib.import_module(SOURCES[source])


def unwrap_state(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict inside a checkpoint object, and the rest of it (``meta``).

    :func:`nonlocalnet.models.weights.unwrap_state` (``state_dict``, ``model_state``,
    ``model``, ``module``, ``state_dict_ema``; a shared ``module.`` prefix stripped).

    Raises:
        ConversionError: not a dict of named tensors.
    """
    with as_conversion_error():
        return weights.unwrap_state(obj)


@dataclass
class Conversion:
    """The result of :func:`convert_state_dict`.

    Attributes:
        state_dict: our keys; loads into ``model`` with ``strict=True``.
        overrides: ``create_model(model_name, **overrides)`` keywords (for a standalone block:
            its constructor keywords).
        report: what was mapped, derived and ignored; the options that make it exact.
        model_name: the registered model, or None (a module of one's own, a block).
        model: the target: built and loaded when the conversion built it; the module given
            (not loaded) otherwise.
    """

    state_dict: dict[str, Tensor]
    overrides: dict[str, Any]
    report: ConversionReport
    model_name: str | None
    model: nn.Module


def _rename(
    source: str, state: Mapping[str, Any], meta: Mapping[str, Any], options: dict
) -> KeyMap:
    conv = get_converter(source)
    params = inspect.signature(conv.rename).parameters
    unknown = sorted(set(options) - (set(params) - {"state", "meta"}))
    if unknown:
        valid = sorted(set(params) - {"state", "meta"})
        raise ConversionError(
            f"{source}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    return conv.rename(state, meta=meta, **options)


def _describe_options(nl: Mapping[str, Any], gc: Mapping[str, Any]) -> dict[str, Any]:
    out = {f"nl.{k}": v for k, v in nl.items() if k != "inner_channels"}
    out.update({f"gc.{k}": v for k, v in gc.items() if k != "ratio"})
    return out


def convert_state_dict(
    state_dict: Mapping[str, Any],
    source: str,
    model: str | nn.Module | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    **options: Any,
) -> Conversion:
    """Convert a checkpoint of another implementation into this library's keys, exactly.

    Args:
        state_dict: the source's state_dict, or a checkpoint dict holding one (``state_dict``,
            ``model_state``, ``model``...); Caffe2: the blobs (see
            :func:`nonlocalnet.convert.caffe2.load_pickle`).
        source: one of :data:`SOURCES`.
        model: the target: a registered name (built with the overrides the source needs), an
            ``nn.Module`` (checked, not modified: its blocks must have the source's options),
            or None for the registered model the checkpoint fits.
        meta: the checkpoint's other entries (mmengine's ``meta`` with its config); taken from
            ``state_dict`` when it is a checkpoint dict.
        **options: the source's options (see its module's ``rename``), e.g. ``pairwise``.

    Returns:
        The :class:`Conversion`.

    Raises:
        ValueError: an unknown source or option.
        ConversionError: a key the source's layout does not have, or a state_dict that does not
            fit the target (missing, unexpected and wrongly shaped keys are named), or blocks
            of a given model built with other options than the source's.
    """
    from nonlocalnet.convert._infer import build_target, infer_target

    state, found_meta = unwrap_state(state_dict)
    km = _rename(source, state, {**found_meta, **(meta or {})}, dict(options))
    km.refuse_unmapped()
    nl_all, gc_all = dict(km.nl_options), dict(km.gc_options)
    nl, gc = split_supported(km)
    builder = dict(km.builder_options)
    block_options = _describe_options(nl_all, gc_all)

    if isinstance(model, nn.Module):
        target_model = model
        name = getattr(model, "model_name", None)
        km.inexact.extend(check_block_options(model, nl, gc, source))
        wrong = stem_mismatches(model, builder)
        if wrong:
            raise ConversionError(
                f"{source}: the given model's stem is not the source's: {'; '.join(wrong)}; "
                "build it with the conversion's overrides (convert with model=None to see them)"
            )
        overrides: dict[str, Any] = {}
        described = name or type(model).__name__
        how = "the given model (not loaded: call model.load_state_dict(conversion.state_dict))"
        built = False
    else:
        inferred = infer_target(km.out, nl, gc, builder)
        target = inferred if model is None else inferred.renamed(model)
        target_model = build_target(target)
        name, overrides = target.name, target.overrides
        described = target.describe()
        how = (
            f"create_model({name!r}, **overrides)"
            if name is not None
            else f"{'NonLocalNd' if target.block == 'nl' else 'GlobalContext'}(**overrides)"
        )
        km.notes.extend(target.notes)
        built = True
        _check_builder_options(builder, km)
    state_out, derived = finalize(km, target_model, strict=True)
    if built:
        target_model.load_state_dict(state_out, strict=True)
    report = ConversionReport(
        source=source,
        target=described,
        build=how,
        mapped=[(km.origin[k], k) for k in state_out if k in km.origin],
        derived=derived,
        ignored=sorted(km.ignored.items()),
        overrides=overrides,
        block_options=block_options,
        notes=list(dict.fromkeys(km.notes)),
        inexact=list(dict.fromkeys(km.inexact)),
    )
    if report.inexact:
        logger.warning("%s -> %s is not exact: %s", source, described, "; ".join(report.inexact))
    return Conversion(state_out, overrides, report, name, target_model)


def _as_tuple(v: Any) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _norm_option(key: str, value: Any) -> Any:
    if key in ("pool2_temporal", "deep_stem", "concat_input"):
        return value
    return _as_tuple(value)


def stem_mismatches(model: nn.Module, builder: Mapping[str, Any]) -> list[str]:
    """Where a given model's stem does not stride and pool as the source's (the weights do
    not say it): ``"<option> is <have>, the source's <want>"``."""
    net = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    have: dict[str, Any] = {}
    conv1, pool, pool2 = (getattr(net, n, None) for n in ("conv1", "maxpool", "pool2"))
    if conv1 is not None and hasattr(conv1, "stride"):
        have["conv1_stride"] = _as_tuple(conv1.stride)
    if pool is not None and hasattr(pool, "kernel_size"):
        have["pool1_kernel"] = _as_tuple(pool.kernel_size)
        have["pool1_stride"] = _as_tuple(pool.stride)
        have["pool1_padding"] = _as_tuple(pool.padding)
    if pool2 is not None:
        have["pool2_temporal"] = _as_tuple(getattr(pool2, "kernel_size", 1))[0]
    have["deep_stem"] = isinstance(getattr(net, "stem", None), nn.Module)
    return [
        f"{k} is {have[k]!r}, the source's {_norm_option(k, v)!r}"
        for k, v in builder.items()
        if k in have and have[k] != _norm_option(k, v)
    ]


def _check_builder_options(builder: Mapping[str, Any], km: KeyMap) -> None:
    """Stem options the source fixes are passed as overrides; say so."""
    if builder:
        shown = {k: v for k, v in builder.items() if not k.startswith("_")}
        if shown:
            km.notes.append(
                "builder options of the source: "
                + ", ".join(
                    f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in shown.items()
                )
            )
