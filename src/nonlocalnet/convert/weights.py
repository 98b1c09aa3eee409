"""Pretrained starts: read a checkpoint file, convert it, and load it into a model.

:func:`load_pretrained` is what ``create_model(name, weights=PATH)`` and a config's
``model.init`` do: the checkpoint (``.pt``/``.pth`` read with ``torch.load(weights_only=True)``,
``.safetensors``, or a Caffe2 ``.pkl`` read by a restricted unpickler) is renamed from its
source's layout into ours, then

* for a video network, 2D kernels are inflated (:func:`~nonlocalnet.models.inflate_state_dict`:
  repeated over time and divided by the temporal size; C2D's 1×k×k kernels take them as they
  are);
* for a segmentation network, a classification ResNet goes into ``model.backbone``;
* the blocks the model inserts (NL after, GC inside residual blocks) and its head stay as
  initialised (the blocks zero-initialised, so the network starts as the pretrained one), and a
  classifier of another size (the ImageNet ``fc``) is dropped.

Anything else that does not fit (a missing backbone key, a key the model does not have, a
backbone tensor of another shape) is an error naming the keys: a checkpoint of another
architecture never loads halfway. The :class:`LoadReport` says what was loaded, what was new
and what was dropped, by key count and names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet.convert._convert import Conversion, _rename, unwrap_state
from nonlocalnet.convert._core import (
    ConversionError,
    KeyMap,
    check_block_options,
    finalize,
    format_keys,
    group_of,
    split_supported,
)
from nonlocalnet.models.video_resnet import inflate_state_dict

__all__ = [
    "FORMATS",
    "LoadReport",
    "create_model",
    "load_pretrained",
    "read_checkpoint",
    "save_converted",
]

logger = logging.getLogger(__name__)

#: checkpoint sources :func:`load_pretrained` takes besides the converters' ("nonlocalnet":
#: keys of this library, e.g. a ``nonlocalnet convert`` output or a training checkpoint).
FORMATS = ("nonlocalnet",)

#: safetensors metadata written by :func:`save_converted`.
META_FORMAT = "nonlocalnet.format"
META_MODEL = "nonlocalnet.model"
META_OVERRIDES = "nonlocalnet.overrides"
META_SOURCE = "nonlocalnet.source"
META_REPORT = "nonlocalnet.report"


def _kind_of(path: Path) -> str:
    """``"zip"`` (torch.save), ``"safetensors"`` or ``"pickle"`` (anything else), by content."""
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return "safetensors"
    return "pickle"


def read_checkpoint(
    path: str | Path, source: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict in a checkpoint file, and the file's other entries.

    Safetensors files give their metadata (strings) as the second value; torch files the
    other entries of the saved dict (``meta``, ``epoch``...); Caffe2 pickles nothing.

    Args:
        path: a ``.pt``/``.pth``/``.ckpt`` (``torch.load`` with ``weights_only=True``), a
            ``.safetensors``, or a ``.pkl`` (source ``"caffe2"``: read by
            :class:`~nonlocalnet.convert.caffe2.RestrictedUnpickler`).
        source: the checkpoint's source; ``"caffe2"`` reads pickles of numpy arrays.

    Raises:
        FileNotFoundError: no such file.
        ConversionError: a file that cannot be read safely (truncated, another format, a
            pickle that would construct arbitrary objects), with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    kind = _kind_of(path)
    if source == "caffe2" or (kind == "pickle" and path.suffix == ".pkl"):
        if kind != "pickle":
            raise ConversionError(
                f"{path}: a Caffe2 checkpoint is a pickle of numpy blobs (.pkl); this is a "
                f"{'torch.save' if kind == 'zip' else kind} file"
            )
        from nonlocalnet.convert.caffe2 import load_pickle

        return load_pickle(path), {}
    if kind == "safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types
            raise ConversionError(
                f"{path}: cannot read the safetensors file (truncated or corrupt?): {err}"
            ) from None
        return dict(state), meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for unsafe pickles, RuntimeError for bad zips
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConversionError(
            f"{path}: cannot be read safely with torch.load(weights_only=True) (truncated, not "
            f"a checkpoint, or it holds objects other than tensors): {text}"
        ) from None
    state, meta = unwrap_state(obj)
    return state, meta


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        path: the checkpoint.
        source: its source.
        model: the model's name (or class).
        loaded: our keys loaded from the checkpoint.
        inflated: those of them inflated from 2D kernels.
        new: the model's keys not in the checkpoint (inserted blocks, a new head).
        dropped: ``(key, why)`` of checkpoint entries not loaded.
        notes: what the conversion assumed or did.
        inexact: reasons the model does not compute what the source computes.
    """

    path: str
    source: str
    model: str
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)

    def _groups(self, keys: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in keys:
            out[group_of(k)] = out.get(group_of(k), 0) + 1
        return out

    def summary(self) -> str:
        """One line: loaded / new / dropped by count, the new and dropped by module."""
        new = ", ".join(f"{g}: {n}" for g, n in self._groups(self.new).items()) or "none"
        dropped = format_keys([k for k, _ in self.dropped], 4) or "none"
        inflated = f" ({len(self.inflated)} inflated from 2D)" if self.inflated else ""
        return (
            f"{self.model} <- {self.path} ({self.source}): loaded {len(self.loaded)} keys"
            f"{inflated}; new {len(self.new)} ({new}); dropped {len(self.dropped)} ({dropped})"
        )

    def table(self) -> str:
        """The summary and the keys per module."""
        lines = [self.summary()]
        for title, keys in (("loaded", self.loaded), ("new", self.new)):
            for g, n in self._groups(keys).items():
                lines.append(f"  {title:<7} {g:<28} {n:>5}")
        reasons: dict[str, list[str]] = {}
        for k, why in self.dropped:
            reasons.setdefault(why, []).append(k)
        for why, keys in reasons.items():
            lines.append(f"  dropped {format_keys(keys, 4)}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  NOT EXACT: {n}" for n in self.inexact]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "source": self.source,
            "model": self.model,
            "loaded": len(self.loaded),
            "inflated": len(self.inflated),
            "new": self._groups(self.new),
            "new_keys": list(self.new),
            "dropped": [list(d) for d in self.dropped],
            "notes": list(self.notes),
            "inexact": list(self.inexact),
        }


def _is_head(key: str) -> bool:
    top = key.split(".")[0]
    return top in ("fc", "head", "aux_head") or key.startswith("backbone.fc.")


def _is_inserted(key: str) -> bool:
    return ".after." in key or ".gc." in key or key.startswith(("after.", "gc."))


def _has_backbone(model: nn.Module) -> bool:
    return isinstance(getattr(model, "backbone", None), nn.Module)


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
        The :class:`LoadReport` (also logged).

    Raises:
        ValueError: an unknown source or option.
        FileNotFoundError: no such file.
        ConversionError: an unreadable file, or a checkpoint of another architecture (the
            keys that do not fit are named).
    """
    if isinstance(path, Mapping):
        state, meta = unwrap_state(path)
        where = "<state_dict>"
    else:
        state, meta = read_checkpoint(path, source)
        where = str(path)
    name = getattr(model, "model_name", type(model).__name__)
    if source in FORMATS:
        if options:
            raise ValueError(f"source 'nonlocalnet' takes no options, got {sorted(options)}")
        km = KeyMap(source, dict(state))
        for k, v in state.items():
            km.put(k, v, k)
        _check_stored_model(meta, model, km)
    else:
        km = _rename(source, state, meta, dict(options))
        km.refuse_unmapped()
    nl, gc = split_supported(km)
    km.inexact.extend(check_block_options(model, nl, gc, source, strict=False))

    target = model.state_dict()
    ours = dict(km.out)
    origin = dict(km.origin)
    if _has_backbone(model) and not any(k.startswith("backbone.") for k in ours):
        ours = {f"backbone.{k}": v for k, v in ours.items()}
        origin = {f"backbone.{k}": v for k, v in origin.items()}
        km.notes.append("a classification network's keys loaded into model.backbone")
        km.fold_bias = {f"backbone.{k}": f"backbone.{v}" for k, v in km.fold_bias.items()}
        km.affine_only = {f"backbone.{p}" for p in km.affine_only}
        km.zero_bias = [
            p.replace("^", "^backbone\\.", 1) if p.startswith("^") else p for p in km.zero_bias
        ]

    inflated: list[str] = []
    if any(v.dim() == 4 and k in target and target[k].dim() == 5 for k, v in ours.items()):
        state_3d, _ = inflate_state_dict(ours, model)
        inflated = [
            k for k, v in ours.items() if k in state_3d and v.dim() == 4 and target[k].dim() == 5
        ]
        for k in inflated:
            ours[k] = state_3d[k]
        km.notes.append(
            f"{len(inflated)} 2D kernels inflated: repeated over time and divided by the "
            "temporal size (C2D kernels, of size 1, as they are)"
        )

    dropped: list[tuple[str, str]] = []
    foreign: list[str] = []
    for k in list(ours):
        if k in target and tuple(ours[k].shape) == tuple(target[k].shape):
            continue
        if _is_head(k):
            why = (
                "classifier of another shape "
                f"({tuple(ours[k].shape)} vs the model's {tuple(target[k].shape)})"
                if k in target
                else "the model has no such head"
            )
            dropped.append((origin.get(k, k), why))
            del ours[k]
        else:
            foreign.append(
                f"{k} {tuple(ours[k].shape)} vs model {tuple(target[k].shape)}"
                if k in target
                else k
            )
    if foreign:
        raise ConversionError(
            f"{where} ({source}) is a checkpoint of another architecture than {name}: "
            f"{len(foreign)} key(s) do not fit: {format_keys(foreign)}"
        )
    km.out, km.origin = ours, {k: v for k, v in origin.items() if k in ours}
    full, _ = finalize(km, model, strict=False)
    missing = [k for k in target if k not in full]
    bad = [k for k in missing if not (_is_head(k) or _is_inserted(k))]
    if bad:
        raise ConversionError(
            f"{where} ({source}) lacks {len(bad)} of {name}'s backbone keys (a checkpoint of "
            f"another architecture?): {format_keys(bad)}"
        )
    if not full:
        raise ConversionError(f"{where} ({source}): no key of the checkpoint fits {name}")
    result = model.load_state_dict(full, strict=False)
    counters = {k for k in missing if k.endswith("num_batches_tracked")}  # BN fills its own
    if (
        set(result.missing_keys) - counters != set(missing) - counters or result.unexpected_keys
    ):  # pragma: no cover
        raise ConversionError(f"loading into {name}: unexpected load result {result}")
    report = LoadReport(
        path=where,
        source=source,
        model=name,
        loaded=[k for k in full if k in target],
        inflated=inflated,
        new=missing,
        dropped=dropped,
        notes=list(dict.fromkeys(km.notes)),
        inexact=list(dict.fromkeys(km.inexact)),
    )
    logger.info("%s", report.summary())
    return report


def _check_stored_model(meta: Mapping[str, Any], model: nn.Module, km: KeyMap) -> None:
    stored = meta.get(META_MODEL)
    name = getattr(model, "model_name", None)
    if stored and name and stored != name:
        km.notes.append(f"the file was converted for {stored!r}, loaded into {name!r}")


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
    it and loads every key (overrides given here win).

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
    if weights is not None and source in FORMATS:
        _, meta = read_checkpoint(weights, source)
        if META_MODEL in meta:
            stored = json.loads(meta.get(META_OVERRIDES) or "{}")
            if name is None:
                name = meta[META_MODEL]
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
