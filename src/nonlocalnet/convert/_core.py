"""Shared machinery of the converters: renaming rules, the report, and the strict check.

A converter turns a checkpoint of another implementation into a state_dict with this library's
keys in two steps:

1. **rename** (one module per source): every source key is either mapped to one of our keys
   (possibly with a tensor transform) or ignored for a stated reason (optimizer momenta, the
   iteration counter, ...); a key that is neither is an error. The source module also records
   what the source computes that the keys do not say: the non-local block's options (pooling
   position and rounding, logit scale), the LayerNorm and BatchNorm eps, builder arguments
   (temporal strides of the stem), in a :class:`KeyMap`.
2. **finalize** against the target model: buffers the source has no slot for are derived
   (``num_batches_tracked``; a zero bias where the source's conv has none; BatchNorm running
   statistics of an affine-only norm), a bias the target has no slot for is folded into the
   BatchNorm that follows it, a BatchNorm eps that differs from the target's is folded into the
   running variance, and the result must match the target's state_dict exactly: the same keys
   and the same shapes (:class:`ConversionError` names every missing, unexpected and wrongly
   shaped key otherwise).

Key lists, the per-module grouping of the reports, the block-option comparison and the error
class come from :mod:`nonlocalnet.models.weights`, which loads the converted state as a
pretrained start.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet.models.weights import (
    LIST_LIMIT,
    WeightsError,
    block_mismatches,
    format_keys,
    group_of,
    supported_gc_options,
    supported_nl_options,
)

__all__ = [
    "ConversionError",
    "ConversionReport",
    "KeyMap",
    "Rule",
    "as_conversion_error",
    "as_tensor",
    "check_block_options",
    "finalize",
    "format_keys",
    "group_of",
    "supported_gc_options",
    "supported_nl_options",
]

logger = logging.getLogger(__name__)


class ConversionError(WeightsError):
    """A checkpoint that does not convert into the target: the message names the keys.

    A :class:`~nonlocalnet.models.weights.WeightsError` (itself a ``ValueError``): what the
    converters raise, including the reading and loading errors of
    :mod:`nonlocalnet.models.weights` they build on.
    """


@contextmanager
def as_conversion_error() -> Iterator[None]:
    """Raise the :class:`~nonlocalnet.models.weights.WeightsError` of a block as
    :class:`ConversionError` (same message)."""
    try:
        yield
    except ConversionError:
        raise
    except WeightsError as err:
        raise ConversionError(str(err)) from None


def as_tensor(value: Any, key: str) -> Tensor:
    """A torch tensor from a tensor or a numeric numpy array (copied, contiguous)."""
    if isinstance(value, Tensor):
        return value.detach()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's extras
        np = None
    if np is not None and isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub":
            raise ConversionError(
                f"{key}: expected a numeric array, got dtype {value.dtype} (shape {value.shape})"
            )
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    raise ConversionError(f"{key}: expected a tensor or numpy array, got {type(value).__name__}")


Replacement = str | Callable[[re.Match[str]], str]


@dataclass(frozen=True)
class Rule:
    """Rename keys matching ``pattern`` (anchored at the start) by ``replacement``.

    The part of the key after the match is kept, so ``Rule(r"backbone\\.", "")`` strips a
    prefix. ``replacement`` is a ``re.sub`` template or a function of the match.
    """

    pattern: str
    replacement: Replacement

    def apply(self, key: str) -> str | None:
        m = re.match(self.pattern, key)
        if m is None:
            return None
        new = self.replacement(m) if callable(self.replacement) else m.expand(self.replacement)
        return new + key[m.end() :]


def rename(key: str, rules: Iterable[Rule]) -> str | None:
    """Apply the first matching rule; None when none matches."""
    for rule in rules:
        new = rule.apply(key)
        if new is not None:
            return new
    return None


def rename_chain(key: str, rules: Iterable[Rule]) -> str:
    """Apply every matching rule in order (each to the result of the previous one)."""
    for rule in rules:
        new = rule.apply(key)
        if new is not None:
            key = new
    return key


@dataclass
class KeyMap:
    """The converted state being built, with where every entry came from.

    Attributes:
        source: the converter's name.
        src: the source state (keys → tensors or arrays).
        out: our key → tensor.
        origin: our key → the source key(s) it came from.
        ignored: source key → why it is not converted.
        derived: our key → how it was filled without a source key.
        nl_options: NonLocalNd keywords that reproduce the source's non-local blocks.
        gc_options: GlobalContext keywords that reproduce the source's GC blocks.
        builder_options: builder keywords (e.g. the stem's temporal strides).
        bn_eps: the source's BatchNorm eps (None: the same as the target's).
        ln_eps: the source's LayerNorm eps in GC blocks (None: the same as the target's).
        zero_bias: patterns of our bias keys the source has no slot for (filled with zeros).
        affine_only: our BatchNorm prefixes the source stores as scale and shift only.
        fold_bias: our bias key → the BatchNorm prefix it may be folded into when the target has
            no slot for it.
        requires: ``(our key, message)``: the target must have that key, or the conversion
            stops with the message (a part of the source our model does not have).
        notes: what the conversion assumed or did, for the report.
        inexact: reasons the converted model will not reproduce the source exactly.
    """

    source: str
    src: dict[str, Any]
    out: dict[str, Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    nl_options: dict[str, Any] = field(default_factory=dict)
    gc_options: dict[str, Any] = field(default_factory=dict)
    builder_options: dict[str, Any] = field(default_factory=dict)
    bn_eps: float | None = None
    ln_eps: float | None = None
    zero_bias: list[str] = field(default_factory=list)
    affine_only: set[str] = field(default_factory=set)
    fold_bias: dict[str, str] = field(default_factory=dict)
    requires: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)

    def put(self, key: str, value: Any, src: str) -> None:
        """Set our ``key`` from source key ``src``."""
        if key in self.out:
            raise ConversionError(
                f"{self.source}: source keys {self.origin[key]!r} and {src!r} both map to {key!r}"
            )
        self.out[key] = as_tensor(value, src)
        self.origin[key] = src

    def ignore(self, key: str, reason: str) -> None:
        """Leave the source key out, for ``reason``."""
        self.ignored[key] = reason

    def rename_all(self, rules: Iterable[Rule], keys: Iterable[str] | None = None) -> list[str]:
        """Map every source key (or those of ``keys``) by the first matching rule.

        Returns:
            The source keys no rule matched (not yet mapped nor ignored).
        """
        rules = list(rules)
        left = []
        for key in self.src if keys is None else keys:
            if key in self.ignored or key in self.origin.values():
                continue
            new = rename(key, rules)
            if new is None:
                left.append(key)
            else:
                self.put(new, self.src[key], key)
        return left

    def unmapped(self) -> list[str]:
        """Source keys neither mapped nor ignored."""
        used = set(self.origin.values()) | set(self.ignored)
        return [k for k in self.src if k not in used]

    def refuse_unmapped(self, what: str = "") -> None:
        """Raise :class:`ConversionError` naming the source keys no rule maps."""
        left = self.unmapped()
        if left:
            raise ConversionError(
                f"{self.source}: {len(left)} checkpoint key(s) with no counterpart"
                f"{' in ' + what if what else ''}: {format_keys(left)}"
            )


# -- the report -----------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What a conversion mapped, derived and ignored, and what it needs for exactness.

    Attributes:
        source: the converter (``"caffe2"``, ``"timm"``, ...).
        target: the model name (or the target module's class).
        mapped: ``(source key, our key)`` pairs.
        derived: ``(our key, how)`` for keys filled without a source key.
        ignored: ``(source key, why)`` for source keys left out.
        overrides: keywords ``create_model(target, **overrides)`` needs for this checkpoint.
        block_options: the non-local / GC block options those overrides set, and why.
        notes: what the conversion assumed or did.
        inexact: reasons the converted model does not reproduce the source exactly; empty
            when it does.
        build: how to build the target (``create_model('nl_i3d_r50', **overrides)``).
    """

    source: str
    target: str
    build: str = ""
    mapped: list[tuple[str, str]] = field(default_factory=list)
    derived: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    block_options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when the converted model computes what the source computes."""
        return not self.inexact

    def counts(self) -> dict[str, dict[str, int]]:
        """Per module of ours (:func:`group_of`): ``{"mapped": n, "derived": m}``."""
        table: dict[str, dict[str, int]] = {}
        for _, key in self.mapped:
            table.setdefault(group_of(key), {"mapped": 0, "derived": 0})["mapped"] += 1
        for key, _ in self.derived:
            table.setdefault(group_of(key), {"mapped": 0, "derived": 0})["derived"] += 1
        return table

    def ignored_counts(self) -> dict[str, int]:
        """How many source keys were ignored, per reason."""
        out: dict[str, int] = {}
        for _, reason in self.ignored:
            out[reason] = out.get(reason, 0) + 1
        return out

    def table(self) -> str:
        """The mapping as a text table: keys per module, ignored keys per reason, options."""
        counts = self.counts()
        width = max([len("module"), *(len(g) for g in counts)])
        lines = [
            f"{self.source} -> {self.target}: {len(self.mapped)} keys mapped, "
            f"{len(self.derived)} derived, {len(self.ignored)} source keys ignored",
            f"  {'module':<{width}} {'mapped':>7} {'derived':>8}",
        ]
        for group, c in counts.items():
            lines.append(f"  {group:<{width}} {c['mapped']:>7} {c['derived']:>8}")
        for reason, n in self.ignored_counts().items():
            lines.append(f"  ignored {n} source key(s): {reason}")
        derived_how: dict[str, int] = {}
        for _, how in self.derived:
            derived_how[how] = derived_how.get(how, 0) + 1
        for how, n in derived_how.items():
            lines.append(f"  derived {n} key(s): {how}")
        if self.block_options:
            opts = ", ".join(f"{k}={v!r}" for k, v in self.block_options.items())
            lines.append(f"  block options for exactness: {opts}")
        if self.build:
            lines.append(f"  build: {self.build}")
        if self.overrides:
            lines.append(f"  overrides: {self.overrides!r}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  NOT EXACT: {n}" for n in self.inexact]
        if not self.inexact:
            lines.append("  exact: the converted model computes what the source computes")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (JSON), with the per-module counts instead of every key."""
        return {
            "source": self.source,
            "target": self.target,
            "build": self.build,
            "mapped": len(self.mapped),
            "derived": len(self.derived),
            "ignored": self.ignored_counts(),
            "modules": self.counts(),
            "overrides": _jsonable(self.overrides),
            "block_options": _jsonable(self.block_options),
            "notes": list(self.notes),
            "inexact": list(self.inexact),
            "exact": self.exact,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# -- options the blocks support -------------------------------------------------------------------


#: options whose absence from the blocks makes a conversion inexact, and what is lost.
_NL_OPTIONAL = {
    "sub_sample_rounding": "NonLocalNd has no sub_sample_rounding option: the key/value "
    "max-pooling rounds up (ceil) where the source rounds down (floor), so outputs differ on "
    "maps of odd height or width",
}
_GC_OPTIONAL = {
    "norm_eps": "GlobalContext has no norm_eps option: its LayerNorm uses eps "
    "1e-5 where the source uses {value!r}",
}


def split_supported(km: KeyMap) -> tuple[dict[str, Any], dict[str, Any]]:
    """The NL and GC options the blocks accept; the others become reasons of inexactness."""
    nl_ok, gc_ok = supported_nl_options(), supported_gc_options()
    nl, gc = {}, {}
    for key, value in km.nl_options.items():
        if key in nl_ok:
            nl[key] = value
        elif key in _NL_OPTIONAL:
            if value != "ceil":
                km.inexact.append(_NL_OPTIONAL[key])
        else:  # pragma: no cover - a converter asking for an option nobody defines
            raise ConversionError(f"{km.source}: NonLocalNd has no option {key!r}")
    for key, value in km.gc_options.items():
        if key in gc_ok:
            gc[key] = value
        elif key in _GC_OPTIONAL:
            if value != 1e-5:
                km.inexact.append(_GC_OPTIONAL[key].format(value=value))
        else:  # pragma: no cover
            raise ConversionError(f"{km.source}: GlobalContext has no option {key!r}")
    return nl, gc


def check_block_options(
    model: nn.Module,
    nl: Mapping[str, Any],
    gc: Mapping[str, Any],
    source: str,
    *,
    strict: bool = True,
) -> list[str]:
    """Compare a given model's blocks with the options the source needs.

    Args:
        model: the model.
        nl: the NL options of the source.
        gc: the GC options of the source.
        source: the source (for messages).
        strict: raise for an option the blocks have but set otherwise; False returns it with
            the others (a pretrained start need not be exact).

    Returns:
        The mismatches that do not raise (reasons of inexactness).

    Raises:
        ConversionError: with ``strict``, a block whose (supported) option differs from the
            source's, naming the block, the option and both values.
    """
    wrong, missing = block_mismatches(model, nl, gc)
    if wrong and not strict:
        return [
            f"{w} (the model's blocks compute otherwise than the source's)" for w in wrong
        ] + missing
    if wrong:
        raise ConversionError(
            f"{source}: the model's blocks are not built as the checkpoint's: {'; '.join(wrong[:4])}"
            f"{f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''}; build the model with "
            "the conversion's overrides"
        )
    return missing


# -- finalize against the target ------------------------------------------------------------------


def _norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm-like modules (running statistics and an eps) by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "running_var") and hasattr(m, "eps") and not isinstance(m, nn.LayerNorm)
    }


def finalize(
    km: KeyMap, model: nn.Module, *, strict: bool = True, check: bool = True
) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    """Complete the converted state against the target model and check it.

    Args:
        km: the renamed state.
        model: the target (only read).
        strict: require exactly the target's keys; otherwise missing keys are allowed (and
            reported by the caller), unexpected and wrongly shaped ones still are not.
        check: False leaves every check but ``km.requires`` to the caller (a pretrained start:
            :func:`~nonlocalnet.models.weights.load_state` checks what may be new or dropped).

    Returns:
        ``(state, derived)``: the state_dict and ``(key, how)`` of the derived keys.

    Raises:
        ConversionError: missing (strict), unexpected or wrongly shaped keys, all named.
    """
    target = model.state_dict()
    for key, message in km.requires:
        if key not in target:
            raise ConversionError(f"{km.source}: {message}")
    state = dict(km.out)
    derived: list[tuple[str, str]] = []
    norms = _norm_modules(model)

    # a bias the target has no slot for: fold into the BatchNorm that follows (y = W x + b then
    # BN: (y - mean) ... = (W x - (mean - b)) ...).
    for bias_key, norm in km.fold_bias.items():
        if bias_key in state and bias_key not in target and f"{norm}.running_mean" in state:
            b = state.pop(bias_key)
            rm = f"{norm}.running_mean"
            state[rm] = (state[rm].double() - b.double()).to(state[rm].dtype)
            km.notes.append(f"{bias_key}: folded into {rm} (the model has no bias there)")

    # affine-only norms: mean 0 and variance 1 - eps make the BatchNorm the affine map itself.
    for prefix in sorted(km.affine_only):
        m = norms.get(prefix)
        eps = float(m.eps) if m is not None else 1e-5
        w = state.get(f"{prefix}.weight")
        if w is None:
            continue
        for name, value in (
            ("running_mean", torch.zeros_like(w)),
            ("running_var", torch.full_like(w, 1.0 - eps, dtype=torch.float64).to(w.dtype)),
        ):
            state[f"{prefix}.{name}"] = value
            derived.append(
                (f"{prefix}.{name}", "affine-only norm of the source (mean 0, var 1-eps)")
            )

    # a BatchNorm eps that differs: (var + eps_src) = (var + eps_src - eps_dst) + eps_dst.
    if km.bn_eps is not None:
        folded = 0
        for prefix, m in norms.items():
            key = f"{prefix}.running_var"
            if key in state and prefix not in km.affine_only and float(m.eps) != km.bn_eps:
                v = state[key]
                state[key] = (v.double() + (km.bn_eps - float(m.eps))).to(v.dtype)
                folded += 1
        if folded:
            km.notes.append(
                f"BatchNorm eps {km.bn_eps!r} of the source folded into running_var "
                f"(+{km.bn_eps - 1e-5:.3g}) of {folded} norm(s): exact in float64; in float32 the "
                "difference is below the resolution of the variances"
            )

    # keys the source has no slot for
    zero_bias = [re.compile(p) for p in km.zero_bias]
    for key, t in target.items():
        if key in state:
            continue
        if key.endswith("num_batches_tracked"):
            if key[: -len("num_batches_tracked")] + "running_mean" not in state:
                continue  # a norm the checkpoint does not have (a new block's)
            state[key] = torch.zeros_like(t)
            derived.append((key, "num_batches_tracked = 0 (not in the source)"))
        elif key.endswith(".bias") and any(p.search(key) for p in zero_bias):
            w = state.get(key[: -len("bias")] + "weight")
            if w is not None:
                state[key] = torch.zeros(t.shape, dtype=w.dtype)
                derived.append((key, "zero bias (the source's conv has none)"))

    # a module registered twice (APNB's shared query/key projection): copy the mapped alias.
    aliases = _aliases(model)
    for key in target:
        if key not in state:
            for alias in aliases.get(key, []):
                if alias in state:
                    state[key] = state[alias]
                    derived.append((key, f"shared with {alias}"))
                    break

    if not check:
        return state, derived
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        + (f" (from {km.origin[k]})" if km.origin.get(k, k) != k else "")
        for k in state
        if k in target and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing: {format_keys(missing)}")
    if unexpected:
        named = [
            f"{k} (from {km.origin[k]})" if km.origin.get(k, k) != k else k for k in unexpected
        ]
        problems.append(f"{len(unexpected)} unexpected: {format_keys(named)}")
    if shapes:
        problems.append(f"{len(shapes)} wrongly shaped: {'; '.join(sorted(shapes)[:LIST_LIMIT])}")
    if problems:
        raise ConversionError(
            f"{km.source} checkpoint does not fit {type(model).__name__}"
            f"{' ' + repr(getattr(model, 'model_name', '')) if getattr(model, 'model_name', '') else ''}: "
            + "; ".join(problems)
        )
    return state, derived


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Key → the other keys of ``model`` naming the same parameter or buffer."""
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    return {
        n: [a for a in names if a != n] for names in by_id.values() for n in names if len(names) > 1
    }
