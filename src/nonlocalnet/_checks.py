"""Input validation shared by every block: errors name what was expected and what came.

The checks of a forward pass stand aside while :mod:`torch.fx` traces symbolically (the input is
then a ``torch.fx.Proxy`` whose shape and dtype are not known), so that
``torchvision.models.feature_extraction.create_feature_extractor`` and other fx-based tools can
trace models built of the blocks; :func:`is_tracing` tells when.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx

try:  # torch.fx symbolic tracing only (not torch.export, which traces real fake tensors)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # older torch
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

__all__ = [
    "autocast_dtype",
    "autocast_enabled",
    "check_choice",
    "check_feature_map",
    "check_tokens",
    "is_tracing",
    "query_index",
]

_LAYOUTS = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}


def is_tracing(*values: object) -> bool:
    """True while :mod:`torch.fx` traces symbolically, or when a value is a ``torch.fx.Proxy``.

    Shapes and dtypes of proxies are themselves proxies, so a Python test on them cannot run;
    input checks skip themselves then (the traced graph runs on real tensors later, through the
    same functional core). ``torch.compile`` and ``torch.export`` trace with real (fake)
    tensors, so the checks run there and become guards.
    """
    return _fx_tracing() or any(isinstance(v, torch.fx.Proxy) for v in values)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for devices without autocast, e.g. meta)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def autocast_dtype(device_type: str, *dtypes: torch.dtype) -> torch.dtype | None:
    """The dtype autocast casts floating tensors to on ``device_type``, or None: autocast is
    off there, or one of ``dtypes`` is float64 (which autocast leaves alone)."""
    if not autocast_enabled(device_type) or torch.float64 in dtypes:
        return None
    return torch.get_autocast_dtype(device_type)


def check_choice(
    name: str, value: object, choices: Iterable[object], *, owner: str | None = None
) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Args:
        name: the argument's name.
        value: the value given.
        choices: the accepted values.
        owner: the module or function reporting the error (prefixes the message).
    """
    choices = tuple(choices)
    try:
        ok = value in choices
    except Exception:  # a value that cannot be compared (e.g. a tensor)
        ok = False
    if isinstance(value, bool):  # True == 1: a flag is not a choice of 1
        ok = any(c is value for c in choices)
    if not ok:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(
            f"{prefix}unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def check_feature_map(
    x: object,
    *,
    spatial_dims: int,
    channels: int | None,
    name: str = "input",
    owner: str = "block",
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> None:
    """Check that ``x`` is a floating (B, C, *spatial) tensor with non-empty dimensions.

    Skipped while :mod:`torch.fx` traces (see :func:`is_tracing`).

    Args:
        x: the tensor to check.
        spatial_dims: number of dimensions after batch and channels (1 for (B, C, L), 2 for
            (B, C, H, W), 3 for (B, C, T, H, W)).
        channels: expected channel count, or None to accept any.
        name: how the tensor is called in the error message.
        owner: the module reporting the error.
        dtype: the dtype of the owner's parameters, which ``x`` must have, unless autocast is
            on for its device and neither is float64 (autocast casts all other floating
            dtypes to its own); None to accept any.
        device: the device of the owner's parameters, which ``x`` must be on; None to accept any.

    Raises:
        TypeError: not a tensor, not a floating-point dtype, or a dtype other than the
            parameters'.
        ValueError: wrong rank, wrong channel count, an empty dimension, or another device
            than the parameters'.
    """
    if is_tracing(x):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    layout = _LAYOUTS.get(spatial_dims, f"(B, C, {spatial_dims} spatial dims)")
    if x.dim() != spatial_dims + 2:
        raise ValueError(
            f"{owner}: {name} must be a {spatial_dims + 2}-d tensor {layout}, "
            f"got {x.dim()}-d with shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must have a floating-point dtype, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{owner}: {name} must have {channels} channels (dim 1 of {layout}), "
            f"got {x.shape[1]} in shape {tuple(x.shape)}"
        )
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{owner}: {name} has an empty dimension: shape {tuple(x.shape)} {layout}")
    if device is not None and x.device != device:
        raise ValueError(
            f"{owner}: {name} is on {x.device}, the parameters on {device}; move the block "
            f"or the {name} to one device"
        )
    if (
        dtype is not None
        and x.dtype != dtype
        and autocast_dtype(x.device.type, x.dtype, dtype) is None
    ):
        raise TypeError(
            f"{owner}: {name} dtype {x.dtype} differs from the parameters' {dtype}; "
            f"call block.to({x.dtype}) or cast the {name} to {dtype}"
        )


def check_tokens(x: torch.Tensor, name: str, rank: int = 3) -> None:
    """Check a (B, N, C) token tensor of the functional core (skipped under fx tracing)."""
    if is_tracing(x):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-d (B, N, C) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")


def _describe(queries: object) -> str:
    if isinstance(queries, torch.Tensor):
        return f"a {queries.dtype} tensor"
    text = repr(queries)
    return text if len(text) <= 60 else text[:57] + "..."


def query_index(
    n: int, queries: Sequence[int] | torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """Flattened query positions for ``attention_map``, as a long tensor.

    Args:
        n: number of query positions.
        queries: integer indices in [0, n) (a sequence of ints or an integer tensor), or None
            for all n. Floats and bools are refused, not rounded.
        device: device of the result.

    Raises:
        ValueError: no index, an index outside [0, n), or indices that are not integers.
    """
    if queries is None:
        return torch.arange(n, device=device)
    if isinstance(queries, torch.Tensor):
        t = queries
    else:
        try:
            t = torch.as_tensor(queries)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"attention_map: queries must be a sequence of ints or an integer tensor, got "
                f"{type(queries).__name__}"
            ) from e
    if t.numel() == 0:
        raise ValueError("attention_map: queries is empty")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"attention_map: queries must be integer indices, got {_describe(queries)}"
        )
    idx = t.to(device=device, dtype=torch.long).reshape(-1)
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"attention_map: query indices must lie in [0, {n}), got range "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return idx
