"""The per-dimension layer tables and the constructor checks every block shares.

One block implementation serves 1d ``(B, C, L)``, 2d ``(B, C, H, W)`` and 3d ``(B, C, T, H, W)``
inputs: it takes ``dims`` and picks its convolution, norm, pooling and dropout here, so that the
parameters keep the layout of the papers' and peers' checkpoints (1×1, 1×1×1 convolutions).

This module depends on torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet._checks import autocast_enabled, check_choice, check_feature_map

__all__ = [
    "ADAPTIVE_AVG_POOL",
    "BATCH_NORM",
    "CONV",
    "DIMS",
    "DROPOUT",
    "MAX_POOL",
    "autocast_input",
    "check_batch_norm_values",
    "check_dims",
    "check_dropout",
    "check_positive_int",
    "eval_batch_norm_affine",
    "linear_1x1",
    "linear_1x1s",
    "parameter_placement",
    "project_map",
    "project_tokens",
]

#: the ``dims`` every block accepts: dimensions after (B, C).
DIMS = (1, 2, 3)

CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DROPOUT: dict[int, type[nn.Module]] = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def check_dims(dims: object, owner: str | None = None) -> None:
    """Raise ``ValueError`` unless ``dims`` is 1, 2 or 3 (``owner`` prefixes the message)."""
    check_choice("dims", dims, DIMS, owner=owner)


def check_positive_int(owner: str, name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ≥ 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_dropout(owner: str, p: object) -> None:
    """Raise ``ValueError`` unless ``p`` is a probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1), got {p!r}")


def parameter_placement(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """``(dtype, device)`` of a block's first floating parameter, which its input must share.

    ``(None, None)`` for a block without parameters. The parameters are visited in the order of
    ``module.parameters()``, without its name bookkeeping (this runs on every forward pass).
    """
    for p in module._parameters.values():
        if p is not None and p.is_floating_point():
            return p.dtype, p.device
    for child in module._modules.values():
        if child is not None:
            found = parameter_placement(child)
            if found[0] is not None:
                return found
    return None, None


def check_block_input(block: nn.Module, x: torch.Tensor) -> None:
    """The input check of a block with ``dims`` and ``channels``: a ``(B, C, *S)`` map of its
    channels, on its parameters' device and in their dtype (autocast aside)."""
    dtype, device = parameter_placement(block)
    check_feature_map(
        x,
        spatial_dims=block.dims,
        channels=block.channels,
        owner=type(block).__name__,
        dtype=dtype,
        device=device,
    )


def check_batch_norm_values(block: nn.Module, x: torch.Tensor, owner: str) -> None:
    """Raise ``ValueError`` if a norm of ``block`` would see a single value to normalise.

    A BatchNorm in training mode needs more than one value per channel (batch × positions > 1),
    a GroupNorm more than one value per group (a norm given as a callable may be one).
    """
    per_channel = x.numel() // x.shape[1]
    if per_channel > 1:
        return
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"{owner}: a BatchNorm in training mode needs more than one value per channel, "
                f"got input shape {tuple(x.shape)} (batch × positions = 1); call block.eval() "
                f"or give a larger input"
            )
        if isinstance(m, nn.GroupNorm) and m.num_channels // m.num_groups < 2:
            raise ValueError(
                f"{owner}: its GroupNorm({m.num_groups}, {m.num_channels}) needs more than one "
                f"value per group, got input shape {tuple(x.shape)}; give a larger input"
            )


def autocast_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` in autocast's dtype when autocast is on for its device and would cast it.

    Several 1×1 convolutions of one input, each computed under autocast, would each cast the
    input again; casting it once first leaves them nothing to do. float64 is left alone, as
    autocast leaves it.
    """
    device = t.device.type
    if not autocast_enabled(device) or t.dtype == torch.float64:
        return t
    dtype = torch.get_autocast_dtype(device)
    return t if t.dtype == dtype else t.to(dtype)


def linear_1x1(tokens: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A 1×1(×1) convolution applied to ``(B, N, C_in)`` tokens: ``(B, N, C_out)``.

    One matrix product over all B·N positions, where the convolution on a ``(B, C, *S)`` map
    runs one product per sample (slow for small maps in large batches).
    """
    weight = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])  # (C_out, C_in)
    return F.linear(tokens, weight, conv.bias)


def _group_sizes(weights: tuple[torch.Tensor, ...], groups: tuple[int, ...]) -> list[int]:
    """Output widths of each group of consecutive weights."""
    if sum(groups) != len(weights):
        raise ValueError(f"groups {groups} must add up to the {len(weights)} weights")
    sizes, start = [], 0
    for g in groups:
        sizes.append(sum(w.shape[0] for w in weights[start : start + g]))
        start += g
    return sizes


def linear_1x1s(
    tokens: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    biases: tuple[torch.Tensor | None, ...],
    groups: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Several 1×1 convolutions of the same ``(B, N, C_in)`` tokens.

    Each group of consecutive weights (``groups``: their counts; one each by default) is one
    output, its weights stacked into one product. With enough positions (B·N ≥ C_in) all the
    weights are stacked into a single product (its backward then forms the input's gradient in
    one product too, instead of one per group plus their sum); with few, stacking them would
    cost more than it saves.

    Args:
        tokens: ``(B, N, C_in)``.
        weights: ``(C_out_k, C_in)`` matrices.
        biases: a ``(C_out_k,)`` bias or None per weight.
        groups: how many consecutive weights each output stacks.

    Returns:
        ``(B, N, Σ C_out_k of the group)`` per group.
    """
    groups = (1,) * len(weights) if groups is None else groups
    sizes = _group_sizes(weights, groups)
    rows = tokens.shape[0] * tokens.shape[1]
    if len(sizes) == 1 or rows >= tokens.shape[-1]:
        w, b = _stacked(weights, biases)
        return tuple(F.linear(tokens, w, b).split(sizes, dim=-1))  # (B, N, C_k) each
    outs, start = [], 0
    for g in groups:
        w, b = _stacked(weights[start : start + g], biases[start : start + g])
        outs.append(F.linear(tokens, w, b))
        start += g
    return tuple(outs)


def project_tokens(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    biases: tuple[torch.Tensor | None, ...],
    groups: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """1×1 convolutions of a ``(B, C_in, N)`` map, returned as ``(B, N, C_out)`` tokens.

    One sample (B = 1): each product reads the map as it lies, W (C_in × N), and the tokens
    are transposed views of the ``(C_out, N)`` results, so no copy transposes anything. Larger
    batches: the map is laid out as ``(B, N, C_in)`` tokens once (one copy) and every product
    runs over all B·N positions at once (:func:`linear_1x1s`). Weights are grouped and stacked
    as in :func:`linear_1x1s`; the rows of one group are contiguous in the B = 1 layout.

    Args:
        x: ``(B, C_in, N)``.
        weights: ``(C_out_k, C_in)`` matrices.
        biases: a ``(C_out_k,)`` bias or None per weight.
        groups: how many consecutive weights each output stacks (one each by default).

    Returns:
        ``(B, N, Σ C_out_k of the group)`` per group (possibly non-contiguous views).
    """
    if x.shape[0] != 1:
        tokens = _as_tokens(x)  # (B, N, C_in), cast for autocast in the same copy
        return linear_1x1s(tokens, weights, biases, groups)
    x = autocast_input(x)
    groups = (1,) * len(weights) if groups is None else groups
    sizes = _group_sizes(weights, groups)
    x2 = x[0]  # (C_in, N)
    if len(sizes) == 1 or x2.shape[1] >= x2.shape[0]:
        outs = _addmm_rows(*_stacked(weights, biases), x2).split(sizes, dim=0)  # (C_k, N) each
    else:
        outs, start = [], 0
        for g in groups:
            w, b = _stacked(weights[start : start + g], biases[start : start + g])
            outs.append(_addmm_rows(w, b, x2))
            start += g
    return tuple(o.t().unsqueeze(0) for o in outs)  # (1, N, C_k) views


def project_map(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, contiguous: bool = True
) -> torch.Tensor:
    """A 1×1 convolution of ``(B, N, C_in)`` tokens, returned as a ``(B, C_out, N)`` map.

    One sample: one product with the tokens read transposed, written in map layout; larger
    batches: one product over all B·N positions, then, if ``contiguous``, one transposing copy
    (otherwise the map is a transposed view of the product).
    """
    if y.shape[0] == 1:
        return _addmm_rows(weight, bias, y[0].t()).unsqueeze(0)  # (1, C_out, N)
    z = F.linear(y, weight, bias).transpose(1, 2)  # (B, C_out, N), a view
    return z.contiguous() if contiguous else z


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, N)`` as contiguous ``(B, N, C)`` tokens, in autocast's dtype when autocast would
    cast them: one copy, whose backward gives a contiguous ``(B, C, N)`` gradient (which autograd
    can then add to x's other gradients in place)."""
    device = x.device.type
    dtype = x.dtype
    if autocast_enabled(device) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
    return _TransposedCopy.apply(x, dtype)


class _TransposedCopy(torch.autograd.Function):
    """``x.transpose(1, 2)`` copied contiguous in ``dtype``; the gradient likewise, back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = x.dtype
        return x.transpose(1, 2).to(dtype=dtype, memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.transpose(1, 2).to(dtype=ctx.dtype, memory_format=torch.contiguous_format), None


def _addmm_rows(w: torch.Tensor, b: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor:
    """``w @ x2 (+ b per row)``: ``(C_out, N)``."""
    if b is None:
        return torch.mm(w, x2)
    return torch.addmm(b.unsqueeze(1), w, x2)


def _stacked(
    weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights stacked along their outputs, and their biases (zeros where one has none)."""
    if len(weights) == 1:
        return weights[0], biases[0]
    weight = torch.cat(weights)
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat(
        [
            b if b is not None else w.new_zeros(w.shape[0])
            for w, b in zip(weights, biases, strict=True)
        ]
    )
    return weight, bias


def eval_batch_norm_affine(norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of a plain BatchNorm in eval mode (running statistics), else None.

    In eval mode BN(z) = z · scale + shift per channel, with scale = γ / √(σ² + eps) (γ = 1
    without affine parameters) and shift = β − μ · scale, so it folds into the product before
    it. Subclasses (e.g. SyncBatchNorm), other norms, and BatchNorms that use batch statistics
    in eval mode (``track_running_stats=False``) give None.
    """
    if type(norm) not in BATCH_NORM.values() or norm.training:
        return None
    if norm.running_mean is None or norm.running_var is None:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)  # (C,)
    if norm.weight is not None:
        scale = scale * norm.weight
    if norm.bias is not None:
        return scale, torch.addcmul(norm.bias, norm.running_mean, scale, value=-1.0)
    return scale, -norm.running_mean * scale
