"""Pretrained starts: a torchvision ResNet or a checkpoint of this library, loaded into any model.

:func:`load_pretrained` is what ``create_model(name, weights=PATH)`` and a config's
``model.init`` do with the two formats that need no converter:

* ``"torchvision"``: a torchvision ResNet (``resnet50-0676ba61.pth``: ``conv1``, ``bn1``,
  ``layer{1..4}.{i}.{conv,bn}{1,2,3}``, ``downsample.{0,1}``, ``fc``), the ImageNet start of
  every recipe of the papers;
* ``"nonlocalnet"``: this library's keys: a training checkpoint (its ``model`` entry), an
  exported ``model.safetensors``, or a file written by ``nonlocalnet convert``, whose metadata
  names the model and the ``create_model`` overrides it was converted for.

The checkpoint's keys are ours, so loading is a per-key operation, then

* a ResNet's keys go into the model's ResNet wherever it sits (``model.backbone`` of a
  segmentation network, ``model.backbone.body`` of a detector);
* for a video network, 2D kernels are inflated
  (:func:`~nonlocalnet.models.video_resnet.inflate_state_dict`: I3D's t×k×k kernels take the 2D
  kernel repeated t times and divided by t; C2D's 1×k×k kernels take it as it is);
* the blocks the model inserts (NL after, GC inside residual blocks) and its heads stay as
  initialised (the blocks zero-initialised, so the network starts as the pretrained one), and a
  classifier of another size (the ImageNet ``fc``) is dropped.

Anything else that does not fit (a missing backbone key, a key the model does not have, a
backbone tensor of another shape) is a :class:`WeightsError` naming the keys: a checkpoint of
another architecture never loads halfway. The :class:`LoadReport` says what was loaded, what is
new and what was dropped, by key count and names.

Checkpoints of other implementations (the official Caffe2 nets, SlowFast, pytorchvideo,
mmaction2, mmdet, mmseg, timm) have other keys and computations: :mod:`nonlocalnet.convert`
renames them and then loads them through :func:`load_state`, the same implementation.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet.functional import default_scale
from nonlocalnet.layers import GlobalContext, NonLocalNd
from nonlocalnet.models.resnet import STAGE_NAMES
from nonlocalnet.models.video_resnet import inflate_state_dict

__all__ = [
    "FORMATS",
    "PEER_SOURCES",
    "TORCHVISION_PATTERNS",
    "LoadReport",
    "WeightsError",
    "block_mismatches",
    "file_kind",
    "format_keys",
    "group_of",
    "load_pretrained",
    "load_state",
    "read_weights",
    "stored_model",
    "supported_gc_options",
    "supported_nl_options",
    "unwrap_state",
]

logger = logging.getLogger(__name__)

#: formats :func:`load_pretrained` reads (no converter needed).
FORMATS = ("torchvision", "nonlocalnet")

#: checkpoints of other implementations: :mod:`nonlocalnet.convert` converts them.
PEER_SOURCES = ("caffe2", "slowfast", "pytorchvideo", "mmaction2", "mmdet", "mmseg", "mmcv", "timm")

#: the keys of a torchvision ResNet (anchored at the start; the parameter name follows).
TORCHVISION_PATTERNS = (
    r"^(conv1|bn1|fc)\.",
    r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.",
)

#: safetensors metadata of a file written by ``nonlocalnet convert``.
META_FORMAT = "nonlocalnet.format"
META_MODEL = "nonlocalnet.model"
META_OVERRIDES = "nonlocalnet.overrides"
META_SOURCE = "nonlocalnet.source"
META_REPORT = "nonlocalnet.report"

#: containers of a state_dict inside a checkpoint file, in the order they are looked for.
_CONTAINERS = ("state_dict", "model_state", "model", "module", "state_dict_ema")

#: how many key names a message lists before "and N more".
LIST_LIMIT = 8

_CLASSIFIER = re.compile(r"(^|\.)(fc|classifier)\.(weight|bias)$")


class WeightsError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model: the message names the keys."""


def format_keys(keys: Iterable[str], limit: int = LIST_LIMIT) -> str:
    """``a, b, c and 12 more`` (sorted)."""
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def group_of(key: str) -> str:
    """The module a key of ours belongs to, for reports.

    ``stem``, ``layer3 (res4)``, ``layer3 (res4) NL blocks``, ``layer2 (res3) GC blocks``,
    ``fc``, ``head``, ``aux_head``, or the key's first component for anything else; a
    ``backbone.`` (``backbone.body.``) prefix is kept in front.
    """
    parts = key.split(".")
    prefix = ""
    for lead in (["backbone", "body"], ["backbone"]):
        if parts[: len(lead)] == lead and len(parts) > len(lead):
            parts, prefix = parts[len(lead) :], " ".join(lead) + " "
            break
    first = parts[0]
    if first in ("conv1", "bn1", "stem"):
        return prefix + "stem"
    m = re.fullmatch(r"layer(\d)", first)
    if m:
        s = int(m.group(1))
        name = f"layer{s} ({STAGE_NAMES[s - 1]})" if 1 <= s <= 4 else first
        if ".after." in key:
            return prefix + name + " NL blocks"
        if ".gc." in key:
            return prefix + name + " GC blocks"
        return prefix + name
    return prefix + first


# -- reading --------------------------------------------------------------------------------------


def unwrap_state(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict inside a checkpoint object, and the rest of it (``meta``).

    Looks into ``state_dict``, ``model_state`` (SlowFast), ``model`` (this library's training
    checkpoints), ``module``, ``state_dict_ema``; strips a ``module.`` prefix (DDP) shared by
    every key; merges a ``meta`` entry (mmengine) into the rest.

    Raises:
        WeightsError: not a dict of named tensors.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"a checkpoint must be a dict of tensors, got {type(obj).__name__}")
    meta: dict[str, Any] = {}
    for key in _CONTAINERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            meta = {k: v for k, v in obj.items() if k != key}
            if isinstance(meta.get("meta"), Mapping):
                meta = {**meta, **meta["meta"]}
            obj = inner
            break
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if not state:
        raise WeightsError("the checkpoint holds no tensors")
    return state, meta


def file_kind(path: Path) -> str:
    """``"zip"`` (torch.save), ``"safetensors"`` or ``"pickle"`` (anything else), by content."""
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return "safetensors"
    return "pickle"


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state_dict in a ``.pt``/``.pth``/``.ckpt`` or ``.safetensors`` file, and the rest.

    Torch files are read with ``torch.load(weights_only=True)`` (a pickle that would construct
    anything but tensors and plain containers is refused, never run); their other entries
    (``optimizer``, ``config``, mmengine's ``meta``...) come as the second value. Safetensors
    files give their metadata (strings): a file written by ``nonlocalnet convert`` names its
    model and overrides there (:func:`stored_model`).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: a file that cannot be read safely (truncated, another format, a pickle of
            other objects), with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    kind = file_kind(path)
    if kind == "safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors comes with the train extra
            raise WeightsError(
                f"{path}: reading .safetensors needs the safetensors package "
                "(pip install safetensors)"
            ) from None
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(
                f"{path}: cannot read the safetensors file (truncated or corrupt?): {err}"
            ) from None
        return dict(state), meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for unsafe pickles, RuntimeError for bad zips
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = (
            "; an official Caffe2 pickle converts with nonlocalnet.convert (source 'caffe2')"
            if path.suffix == ".pkl"
            else ""
        )
        raise WeightsError(
            f"{path}: cannot be read safely with torch.load(weights_only=True) (truncated, not "
            f"a checkpoint, or it holds objects other than tensors): {text}{hint}"
        ) from None
    return unwrap_state(obj)


def stored_model(meta: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The model a converted file was written for: ``(name, create_model overrides)``.

    ``(None, {})`` for a file without that metadata (a torchvision checkpoint, an export).
    """
    if meta.get(META_FORMAT) != "nonlocalnet":
        return None, {}
    try:
        overrides = json.loads(meta.get(META_OVERRIDES) or "{}")
    except (TypeError, json.JSONDecodeError):
        raise WeightsError(
            f"the file's {META_OVERRIDES} metadata is not JSON: {meta.get(META_OVERRIDES)!r}"
        ) from None
    return meta.get(META_MODEL) or None, dict(overrides)


# -- the blocks' options ----------------------------------------------------------------------------


def supported_nl_options() -> set[str]:
    """Keyword arguments of :class:`~nonlocalnet.layers.NonLocalNd`."""
    return set(inspect.signature(NonLocalNd.__init__).parameters) - {"self", "channels"}


def supported_gc_options() -> set[str]:
    """Keyword arguments of :class:`~nonlocalnet.layers.GlobalContext`."""
    return set(inspect.signature(GlobalContext.__init__).parameters) - {"self", "channels"}


def block_mismatches(
    model: nn.Module, nl: Mapping[str, Any], gc: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """Where the model's NL and GC blocks are not built with the given options.

    Args:
        model: the model.
        nl: :class:`~nonlocalnet.layers.NonLocalNd` options (``use_scale`` compares the
            resulting logit scale; widths, norm, impl and initialisation are not compared).
        gc: :class:`~nonlocalnet.layers.GlobalContext` options (``fusion`` as a set,
            ``norm_eps`` the LayerNorm's eps).

    Returns:
        ``(wrong, lacking)``: ``"<block>.<option> is <have>, the source's <want>"`` for options
        the blocks take but are set otherwise, and ``"<block>: <option> <want> (the model:
        <have>)"`` for options the blocks do not take.
    """
    nl_ok, gc_ok = supported_nl_options(), supported_gc_options()
    wrong: list[str] = []
    lacking: list[str] = []

    def compare(name: str, key: str, have: Any, want: Any, ok: set[str]) -> None:
        if have != want:
            if key in ok:
                wrong.append(f"{name or 'block'}.{key} is {have!r}, the source's {want!r}")
            else:
                lacking.append(f"{name or 'block'}: {key} {want!r} (the model: {have!r})")

    for name, m in model.named_modules():
        if isinstance(m, NonLocalNd) and nl:
            for key, want in nl.items():
                if key == "use_scale":
                    dot = m.channels if m.pairwise == "gaussian" else m.inner_channels
                    pairwise = nl.get("pairwise", m.pairwise)
                    have, want = m.scale, default_scale(pairwise, dot, want)
                elif key in ("inner_channels", "norm", "impl", "zero_init", "device", "dtype"):
                    continue  # shapes are checked with the keys; impl/init do not change outputs
                elif hasattr(m, key):
                    have = getattr(m, key)
                else:
                    continue
                compare(name, key, have, want, nl_ok)
        if isinstance(m, GlobalContext) and gc:
            for key, want in gc.items():
                if key == "fusion":
                    want = tuple(f for f in ("mul", "add") if f in want)
                    have = m.fusion
                elif key == "norm_eps":
                    lns = [x for x in m.modules() if isinstance(x, nn.LayerNorm)]
                    have = lns[0].eps if lns else want
                elif key in ("ratio", "device", "dtype"):
                    continue  # the shapes say it
                elif hasattr(m, key):
                    have = getattr(m, key)
                else:
                    continue
                compare(name, key, have, want, gc_ok)
    return wrong, lacking


def _stored_report(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A converted file's record: its NL and GC options (``nl.<option>``, ``gc.<option>`` in
    the report's ``block_options``) and what its conversion said was not exact."""
    try:
        report = json.loads(meta.get(META_REPORT) or "{}")
    except (TypeError, json.JSONDecodeError):
        return {}, {}, []
    options = report.get("block_options") or {}
    nl = {k[3:]: v for k, v in options.items() if k.startswith("nl.")}
    gc = {k[3:]: v for k, v in options.items() if k.startswith("gc.")}
    return nl, gc, [str(r) for r in report.get("inexact") or []]


# -- the report -----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a pretrained start did.

    Attributes:
        path: the checkpoint (``"<state_dict>"`` for one given in memory).
        source: its format or source.
        model: the model's name (or class).
        loaded: our keys loaded from the checkpoint.
        inflated: those of them inflated from 2D kernels.
        new: the model's keys not in the checkpoint (inserted blocks, a new head), left as
            initialised.
        dropped: ``(key, why)`` of checkpoint entries not loaded (a classifier of another size).
        notes: what the loading assumed or did.
        inexact: reasons the model does not compute what the checkpoint's network computed.
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

    @staticmethod
    def _groups(keys: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in keys:
            out[group_of(k)] = out.get(group_of(k), 0) + 1
        return out

    def summary(self) -> str:
        """One line: loaded / new / dropped by count, the new by module, the dropped by name."""
        new = ", ".join(f"{g}: {n}" for g, n in self._groups(self.new).items()) or "none"
        dropped = format_keys([k for k, _ in self.dropped], 4) or "none"
        inflated = f" ({len(self.inflated)} inflated from 2D)" if self.inflated else ""
        return (
            f"{self.model} <- {self.path} ({self.source}): loaded {len(self.loaded)} keys"
            f"{inflated}; new {len(self.new)} ({new}); dropped {len(self.dropped)} ({dropped})"
        )

    def table(self) -> str:
        """The summary, the keys per module, the notes and what is not exact."""
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
        """Plain types (JSON): counts, the new keys, the dropped ones with their reasons."""
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


# -- loading --------------------------------------------------------------------------------------


def _is_inserted(key: str) -> bool:
    return ".after." in key or ".gc." in key or key.startswith(("after.", "gc."))


def _is_head(key: str, prefix: str) -> bool:
    if not key.startswith(prefix):
        return True  # the model around its ResNet (segmentation heads, FPN, RPN, RoI heads)
    top = key.split(".")[0]
    return top in ("fc", "head", "aux_head") or key.startswith(f"{prefix}fc.")


def _resnet_prefix(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str:
    """Where a ResNet's keys go in the model: ``""``, ``"backbone."``, ``"backbone.body."``."""
    probe = "layer1.0.conv1.weight"
    if probe not in state or probe in target:
        return ""
    found = sorted(k[: -len(probe)] for k in target if k.endswith("." + probe))
    if len(found) > 1:
        raise WeightsError(
            f"the model holds {len(found)} ResNets ({', '.join(p[:-1] for p in found)}); load "
            "the checkpoint into one of them (load_pretrained(model.<name>, ...))"
        )
    return found[0] if found else ""


Completion = Callable[[dict[str, Tensor], str], tuple[dict[str, Tensor], list[str]]]


def load_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    where: str = "<state_dict>",
    source: str = "nonlocalnet",
    origin: Mapping[str, str] | None = None,
    complete: Completion | None = None,
    notes: Sequence[str] = (),
    inexact: Sequence[str] = (),
) -> LoadReport:
    """Load a state_dict with this library's keys into ``model`` as a pretrained start.

    The steps of the module's overview: into the model's ResNet, inflated to video kernels,
    the inserted blocks and heads new, a classifier of another size dropped, everything else
    checked.

    Args:
        model: the network (loaded in place).
        state: our keys → tensors.
        where: the checkpoint's name, for messages and the report.
        source: its format or source, for messages and the report.
        origin: our key → the checkpoint's key it came from (the report names dropped entries
            by the checkpoint's keys).
        complete: called with the state (prefixed, inflated, classifier dropped) and the
            prefix of the model's ResNet; returns the state with the entries the checkpoint
            has no slot for derived, and notes (the converters' BatchNorm folding).
        notes: what the caller assumed or did, for the report.
        inexact: reasons the model will not compute what the checkpoint's network computed.

    Returns:
        The :class:`LoadReport` (also logged).

    Raises:
        WeightsError: a checkpoint of another architecture (the keys that do not fit are
            named), or one of which no key fits.
    """
    name = str(getattr(model, "model_name", None) or type(model).__name__)
    target = model.state_dict()
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"{where}: a state_dict maps names to tensors; {format_keys(bad, 4)} "
            f"{'is' if len(bad) == 1 else 'are'} {type(state[bad[0]]).__name__}"
        )
    ours = dict(state)
    origin = {k: origin.get(k, k) if origin else k for k in ours}
    notes = list(notes)

    prefix = _resnet_prefix(ours, target)
    if prefix:
        ours = {prefix + k: v for k, v in ours.items()}
        origin = {prefix + k: v for k, v in origin.items()}
        notes.append(f"a ResNet's keys loaded into model.{prefix[:-1]}")

    inflated = [k for k, v in ours.items() if v.dim() == 4 and k in target and target[k].dim() == 5]
    if inflated:
        state_3d, _ = inflate_state_dict({k: ours[k] for k in inflated}, model)
        inflated = [k for k in inflated if k in state_3d]
        ours.update({k: state_3d[k] for k in inflated})
        notes.append(
            f"{len(inflated)} 2D kernels inflated: repeated over time and divided by the "
            "temporal size (C2D's kernels, of temporal size 1, as they are)"
        )

    dropped: list[tuple[str, str]] = []
    for k in list(ours):
        if _CLASSIFIER.search(k) and (
            k not in target or tuple(ours[k].shape) != tuple(target[k].shape)
        ):
            why = (
                f"classifier of another shape ({tuple(ours[k].shape)} vs the model's "
                f"{tuple(target[k].shape)})"
                if k in target
                else "the model has no such classifier"
            )
            dropped.append((origin.get(k, k), why))
            del ours[k]

    if complete is not None:
        ours, more = complete(ours, prefix)
        notes += more

    # BatchNorm step counters: zero where the checkpoint has none (old torchvision files);
    # left out where the model's norms keep none (frozen BatchNorm).
    for key, t in target.items():
        norm = key[: -len("num_batches_tracked")]
        if (
            key.endswith("num_batches_tracked")
            and key not in ours
            and f"{norm}running_mean" in ours
        ):
            ours[key] = torch.zeros_like(t)
    counters = [k for k in ours if k.endswith("num_batches_tracked") and k not in target]
    for k in counters:
        del ours[k]
    if counters:
        notes.append(
            f"{len(counters)} BatchNorm step counters (num_batches_tracked) not kept: the "
            "model's norms keep none (frozen BatchNorm)"
        )

    foreign = [
        f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" if k in target else k
        for k, v in ours.items()
        if k not in target or tuple(v.shape) != tuple(target[k].shape)
    ]
    if foreign:
        raise WeightsError(
            f"{where} ({source}) is a checkpoint of another architecture than {name}: "
            f"{len(foreign)} key(s) do not fit: {format_keys(foreign)}"
        )
    missing = [k for k in target if k not in ours]
    lacking = [k for k in missing if not (_is_head(k, prefix) or _is_inserted(k))]
    if lacking:
        raise WeightsError(
            f"{where} ({source}) lacks {len(lacking)} of {name}'s backbone keys (a checkpoint of "
            f"another architecture?): {format_keys(lacking)}"
        )
    if not ours:
        raise WeightsError(f"{where} ({source}): no key of the checkpoint fits {name}")
    result = model.load_state_dict(ours, strict=False)
    filled = {k for k in missing if k.endswith("num_batches_tracked")}  # BatchNorm fills its own
    if set(result.missing_keys) - filled != set(missing) - filled or result.unexpected_keys:
        raise WeightsError(  # pragma: no cover - the checks above leave nothing to find here
            f"loading into {name}: unexpected load result {result}"
        )
    report = LoadReport(
        path=where,
        source=source,
        model=name,
        loaded=list(ours),
        inflated=inflated,
        new=missing,
        dropped=dropped,
        notes=list(dict.fromkeys(notes)),
        inexact=list(dict.fromkeys(inexact)),
    )
    logger.info("%s", report.summary())
    for reason in report.inexact:
        logger.warning("%s: not exact: %s", name, reason)
    return report


def _peer_error(source: str) -> ValueError:
    return ValueError(
        f"source {source!r} is a checkpoint of another implementation: convert it with "
        f"nonlocalnet.convert.create_model(name, weights=..., source={source!r}) (or "
        f"nonlocalnet.convert.load_pretrained(model, path, source={source!r})), or write it as "
        f"this library's file with `nonlocalnet convert --from {source} IN --model NAME --out "
        "OUT.safetensors` and load OUT with source='nonlocalnet'"
    )


def _check_torchvision_keys(state: Mapping[str, Any], where: str) -> None:
    patterns = [re.compile(p) for p in TORCHVISION_PATTERNS]
    other = [k for k in state if not any(p.match(k) for p in patterns)]
    if other:
        raise WeightsError(
            f"{where}: {len(other)} key(s) are not a torchvision ResNet's: {format_keys(other)}; "
            "a checkpoint of this library loads with source='nonlocalnet', one of another "
            "implementation converts with nonlocalnet.convert"
        )


def load_pretrained(
    model: nn.Module,
    path_or_state: str | Path | Mapping[str, Any],
    *,
    source: str = "torchvision",
) -> LoadReport:
    """Initialise ``model`` from a torchvision ResNet or a checkpoint of this library.

    ``create_model(name, weights=PATH)`` is ``load_pretrained(create_model(name), PATH)``.

    Args:
        model: the network (loaded in place; its inserted blocks and heads stay as initialised
            unless the checkpoint has them).
        path_or_state: a ``.pt``/``.pth`` or ``.safetensors`` file (:func:`read_weights`), or a
            state_dict (or a checkpoint dict holding one).
        source: ``"torchvision"`` (a torchvision ResNet's keys only) or ``"nonlocalnet"``
            (this library's keys: a training checkpoint, an export, a converted file).

    Returns:
        The :class:`LoadReport` (also logged); for a converted file whose blocks were built
        with other options than the model's, ``inexact`` says which.

    Raises:
        ValueError: an unknown source, or one of :data:`PEER_SOURCES` (the message says how to
            convert it).
        FileNotFoundError: no such file.
        WeightsError: an unreadable file, or a checkpoint of another architecture (the keys
            that do not fit are named).
    """
    if source in PEER_SOURCES:
        raise _peer_error(source)
    if source not in FORMATS:
        raise ValueError(
            f"unknown checkpoint source {source!r}; expected 'torchvision' or 'nonlocalnet' "
            f"(checkpoints of {', '.join(PEER_SOURCES)} convert with nonlocalnet.convert)"
        )
    if isinstance(path_or_state, Mapping):
        state, meta = unwrap_state(path_or_state)
        where = "<state_dict>"
    else:
        state, meta = read_weights(path_or_state)
        where = str(path_or_state)
    notes: list[str] = []
    inexact: list[str] = []
    if source == "torchvision":
        _check_torchvision_keys(state, where)
    else:
        stored, _ = stored_model(meta)
        name = getattr(model, "model_name", None)
        if stored:
            converted_from = meta.get(META_SOURCE)
            notes.append(
                f"converted for {stored!r}"
                + (f" from a {converted_from} checkpoint" if converted_from else "")
                + (f"; loaded into {name!r}" if name and name != stored else "")
            )
            nl, gc, conversion = _stored_report(meta)
            wrong, lacking = block_mismatches(model, nl, gc)
            inexact += [
                f"{w} (build the model with the file's overrides: "
                "nonlocalnet.convert.create_model(weights=PATH, source='nonlocalnet'))"
                for w in wrong
            ]
            inexact += lacking + [f"the conversion: {r}" for r in conversion]
    return load_state(model, state, where=where, source=source, notes=notes, inexact=inexact)
