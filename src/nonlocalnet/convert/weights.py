"""Pretrained starts from any source: convert a checkpoint, then load it as ours.

:func:`load_pretrained` takes the formats of :func:`nonlocalnet.models.weights.load_pretrained`
(``"torchvision"``, ``"nonlocalnet"``) and every converter source: the checkpoint (``.pt``/
``.pth`` read with ``torch.load(weights_only=True)``, ``.safetensors``, or a Caffe2 ``.pkl`` read
by a restricted unpickler) is renamed from its source's layout into ours
(:func:`~nonlocalnet.convert.convert_state_dict`'s renaming), and then loaded by
:func:`nonlocalnet.models.weights.load_state`, the implementation every pretrained start
shares: into the model's ResNet, 2D kernels inflated for video networks, the inserted blocks
and heads new, a classifier of another size dropped, anything else that does not fit an error
naming the keys. Between the two, the converter's completion runs (BatchNorm eps and biases
folded, affine-only norms, step counters), and the model's blocks and stem are compared with
the source's: a pretrained start need not be exact, and the report says where it is not.

:func:`save_converted` writes a conversion as safetensors with the model's name and
``create_model`` overrides in its metadata; :func:`create_model` rebuilds a model from such a
file (or from any checkpoint and a name).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from nonlocalnet.convert._convert import (
    Conversion,
    _rename,
    get_converter,
    stem_mismatches,
    unwrap_state,
)
from nonlocalnet.convert._core import (
    ConversionError,
    KeyMap,
    as_conversion_error,
    check_block_options,
    finalize,
    split_supported,
)
from nonlocalnet.models.weights import (
    FORMATS,
    META_FORMAT,
    META_MODEL,
    META_OVERRIDES,
    META_REPORT,
    META_SOURCE,
    LoadReport,
    file_kind,
    load_state,
    read_weights,
    stored_model,
)
from nonlocalnet.models.weights import load_pretrained as load_ours

__all__ = [
    "FORMATS",
    "LoadReport",
    "create_model",
    "load_pretrained",
    "read_checkpoint",
    "save_converted",
]

logger = logging.getLogger(__name__)


def read_checkpoint(
    path: str | Path, source: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict in a checkpoint file, and the file's other entries.

    Safetensors files give their metadata (strings) as the second value; torch files the
    other entries of the saved dict (``meta``, ``epoch``...); Caffe2 pickles nothing.

    Args:
        path: a ``.pt``/``.pth``/``.ckpt`` or ``.safetensors``
            (:func:`nonlocalnet.models.weights.read_weights`), or a ``.pkl`` (source
            ``"caffe2"``: read by :class:`~nonlocalnet.convert.caffe2.RestrictedUnpickler`).
        source: the checkpoint's source; ``"caffe2"`` reads pickles of numpy arrays.

    Raises:
        FileNotFoundError: no such file.
        ConversionError: a file that cannot be read safely (truncated, another format, a
            pickle that would construct arbitrary objects), with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    kind = file_kind(path)
    if source == "caffe2" or (kind == "pickle" and path.suffix == ".pkl"):
        if kind != "pickle":
            raise ConversionError(
                f"{path}: a Caffe2 checkpoint is a pickle of numpy blobs (.pkl); this is a "
                f"{'torch.save' if kind == 'zip' else kind} file"
            )
        from nonlocalnet.convert.caffe2 import load_pickle

        return load_pickle(path), {}
    with as_conversion_error():
        return read_weights(path)


def _prefixed(km: KeyMap, prefix: str) -> None:
    """Move the converter's records under ``prefix`` (the model's ResNet, e.g. ``backbone.``)."""
    if not prefix:
        return
    km.fold_bias = {f"{prefix}{k}": f"{prefix}{v}" for k, v in km.fold_bias.items()}
    km.affine_only = {f"{prefix}{p}" for p in km.affine_only}
    km.zero_bias = [
        p.replace("^", "^" + re.escape(prefix), 1) if p.startswith("^") else p for p in km.zero_bias
    ]
    km.requires = [(f"{prefix}{k}", why) for k, why in km.requires]


def load_pretrained(
    model: nn.Module,
    path: str | Path | Mapping[str, Any],
    *,
    source: str = "torchvision",
    **options: Any,
) -> LoadReport:
    """Initialise ``model`` from a checkpoint of ``source`` (ImageNet start, fine-tuning).

    Args:
        model: the network (its inserted blocks and head are left as initialised unless the
            checkpoint has them).
        path: a checkpoint file (see :func:`read_checkpoint`) or a state_dict.
        source: ``"torchvision"``, ``"nonlocalnet"`` (this library's keys) or a converter
            source (:data:`~nonlocalnet.convert.SOURCES`).
        **options: the converter's options (e.g. ``pairwise`` for mmaction2).

    Returns:
        The :class:`~nonlocalnet.models.weights.LoadReport` (also logged).

    Raises:
        ValueError: an unknown source or option.
        FileNotFoundError: no such file.
        ConversionError: an unreadable file, or a checkpoint of another architecture (the
            keys that do not fit are named).
    """
    if source in FORMATS:
        if options:
            raise ValueError(f"source {source!r} takes no options, got {sorted(options)}")
        with as_conversion_error():
            return load_ours(model, path, source=source)
    get_converter(source)  # an unknown source: ValueError naming the known ones
    if isinstance(path, Mapping):
        state, meta = unwrap_state(path)
        where = "<state_dict>"
    else:
        state, meta = read_checkpoint(path, source)
        where = str(path)
    km = _rename(source, state, meta, dict(options))
    km.refuse_unmapped()
    nl, gc = split_supported(km)
    km.inexact.extend(check_block_options(model, nl, gc, source, strict=False))
    km.inexact.extend(
        f"the stem: {w} (build the model with the conversion's overrides to reproduce the source)"
        for w in stem_mismatches(model, km.builder_options)
    )

    def complete(ours: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
        _prefixed(km, prefix)
        km.out = ours
        km.origin = {k: km.origin.get(k[len(prefix) :], k) for k in ours}
        before = len(km.notes)
        state, _ = finalize(km, model, strict=False, check=False)
        return state, km.notes[before:]

    with as_conversion_error():
        return load_state(
            model,
            km.out,
            where=where,
            source=source,
            origin=km.origin,
            complete=complete,
            notes=km.notes,
            inexact=km.inexact,
        )


def save_converted(conversion: Conversion, path: str | Path, *, source: str | None = None) -> Path:
    """Write a conversion as safetensors, with the model name and overrides as metadata.

    Also writes ``<path>.json`` beside it (model, overrides, report), so that
    ``create_model(weights=path, source="nonlocalnet")`` rebuilds the model exactly.

    Args:
        conversion: the result of :func:`~nonlocalnet.convert.convert_state_dict`.
        path: the ``.safetensors`` file to write.
        source: the checkpoint's source (default: the report's).

    Returns:
        The path written.
    """
    from safetensors.torch import save

    path = Path(path)
    report = conversion.report
    meta = {
        META_FORMAT: "nonlocalnet",
        META_SOURCE: source or report.source,
        META_MODEL: conversion.model_name or "",
        META_OVERRIDES: json.dumps(report.to_dict()["overrides"]),
        META_REPORT: json.dumps(report.to_dict()),
    }
    if not conversion.model_name:
        meta.pop(META_MODEL)
    data = save(_tensors(conversion.state_dict), metadata=meta)
    _atomic_write(path, data)
    sidecar = {
        "model": conversion.model_name,
        "overrides": report.to_dict()["overrides"],
        "report": report.to_dict(),
    }
    _atomic_write(
        path.with_name(path.name + ".json"), (json.dumps(sidecar, indent=2) + "\n").encode()
    )
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_model(
    name: str | None = None,
    *,
    weights: str | Path | None = None,
    source: str = "torchvision",
    weights_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """``create_model(name, **overrides)``, then :func:`load_pretrained` from ``weights``.

    A file written by ``nonlocalnet convert`` (source ``"nonlocalnet"``) names its model and
    overrides: ``create_model(weights="nl_i3d.safetensors", source="nonlocalnet")`` rebuilds
    it and loads every key (overrides given here win; with another ``name``, the file's
    overrides do not apply and the report says where the blocks differ).

    Args:
        name: a registered model; may be omitted for a converted file that names one.
        weights: the checkpoint (None: no pretrained start).
        source: its format (see :func:`load_pretrained`).
        weights_options: the converter's options.
        **overrides: ``create_model`` overrides.

    Returns:
        The model; its ``load_report`` attribute holds the :class:`LoadReport`.
    """
    from nonlocalnet.models.zoo import create_model as build

    stored: dict[str, Any] = {}
    if weights is not None and source == "nonlocalnet":
        _, meta = read_checkpoint(weights, source)
        with as_conversion_error():
            stored_name, stored = stored_model(meta)
        if name is None:
            name = stored_name
        elif name != stored_name:
            stored = {}  # the overrides of another model; the report says what differs
    if name is None:
        raise ValueError("create_model: a model name is needed (the weights file names none)")
    model = build(name, **{**stored, **overrides})
    if weights is not None:
        model.load_report = load_pretrained(
            model, weights, source=source, **dict(weights_options or {})
        )
    return model


def _tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
