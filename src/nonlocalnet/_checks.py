"""Input validation shared by every block: errors name what was expected and what came."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def check_feature_map(
    x: object,
    *,
    spatial_dims: int,
    channels: int | None,
    name: str = "input",
    owner: str = "block",
) -> None:
    """Check that ``x`` is a floating (B, C, *spatial) tensor with non-empty dimensions.

    Args:
        x: the tensor to check.
        spatial_dims: number of dimensions after batch and channels (1 for (B, C, L), 2 for
            (B, C, H, W), 3 for (B, C, T, H, W)).
        channels: expected channel count, or None to accept any.
        name: how the tensor is called in the error message.
        owner: the module reporting the error.

    Raises:
        TypeError: not a tensor, or not a floating-point dtype.
        ValueError: wrong rank, wrong channel count or an empty dimension.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}.get(
        spatial_dims, f"(B, C, {spatial_dims} spatial dims)"
    )
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


def check_tokens(x: torch.Tensor, name: str, rank: int = 3) -> None:
    """Check a (B, N, C) token tensor of the functional core."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-d (B, N, C) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")


def query_index(
    n: int, queries: Sequence[int] | torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """Flattened query positions for ``attention_map``, as a long tensor.

    Args:
        n: number of query positions.
        queries: indices in [0, n), or None for all n.
        device: device of the result.

    Raises:
        ValueError: no index, or an index outside [0, n).
    """
    if queries is None:
        return torch.arange(n, device=device)
    idx = torch.as_tensor(queries, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("attention_map: queries is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"attention_map: query indices must lie in [0, {n}), got range "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return idx
