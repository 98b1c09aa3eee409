"""Global context blocks of Cao et al., *GCNet: Non-local Networks Meet Squeeze-Excitation
Networks and Beyond* (ICCVW 2019), and the squeeze-excitation block they compare with.

GCNet observes that the attention maps of a trained non-local block are nearly the same for every
query, so it computes one query-independent map:

* :class:`SimplifiedNonLocal` (SNL): z_i = x_i + W_v Σ_j softmax_j(W_k x_j) x_j.
* :class:`GlobalContext` (GC): context c = Σ_j softmax_j(W_k x_j) x_j (``pooling="att"``) or the
  mean of x (``pooling="avg"``); transform t = conv(C → C·r) → LayerNorm → ReLU → conv(C·r → C);
  fusion z = x + t_add (``"add"``), z = x ⊙ sigmoid(t_mul) (``"mul"``), or both, multiply first.
* :class:`SqueezeExcite` (SE): z = x ⊙ sigmoid(fc2(ReLU(fc1(mean(x))))).

Every block takes ``dims`` in {1, 2, 3} and uses 1×1(×1) convolutions of that dimension, so the
parameters have the layout of the official GCNet / mmcv ``ContextBlock`` checkpoints
(``conv_mask``, ``transform_add`` ↔ ``channel_add_conv``, ``transform_mul`` ↔ ``channel_mul_conv``).

The attention pooling Σ_j softmax_j(ℓ_j) x_j is softmax attention with one constant query, and its
reference path is exactly that, through :func:`nonlocalnet.functional.softmax_aggregate`. The fast
path computes the 1×N softmax once and contracts it with x in its native ``(B, C, N)`` layout (one
bmm), never broadcasting the weights over the channels. Softmax and LayerNorm run in (at least)
float32, also under bfloat16/float16 autocast.

The LayerNorm's eps is ``norm_eps``: 1e-5 (PyTorch's default, as mmcv's ``ContextBlock`` and the
official code) unless given; timm's ``GlobalContext`` uses 1e-6 (its ``LayerNorm2d``), so
``norm_eps=1e-6`` reproduces converted timm weights exactly.

The forward passes trace with :mod:`torch.fx` (``create_feature_extractor``): the input checks
stand aside while tracing, and the attention pooling and the float32 LayerNorm are leaf calls.

This module depends on torch alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocalnet._checks import autocast_enabled, check_choice, query_index
from nonlocalnet.functional import DISPATCH_IMPLS, softmax_aggregate
from nonlocalnet.layers._dims import CONV, check_block_input, check_dims, check_positive_int
from nonlocalnet.layers.layout import AttentionLayout

__all__ = [
    "FUSIONS",
    "POOLINGS",
    "GlobalContext",
    "SimplifiedNonLocal",
    "SqueezeExcite",
    "attention_pool",
    "masked_attention_pool",
]

POOLINGS = ("att", "avg")
FUSIONS = ("add", "mul")


def _reduced_channels(owner: str, channels: int, ratio: float) -> int:
    """C·r as mmcv computes it (``int(C * r)``), which must be at least 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{owner}: ratio must be a number in (0, 1], got {ratio!r}")
    planes = int(channels * ratio)
    if planes < 1:
        raise ValueError(
            f"{owner}: channels * ratio must be >= 1, got {channels} * {ratio} = {channels * ratio}"
        )
    return planes


def _unit_dims(c: Tensor, dims: int) -> Tensor:
    """``(B, C)`` -> ``(B, C, 1, ...)``, one 1 per spatial dim (a view)."""
    return c[(..., *([None] * dims))]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def attention_pool(x: Tensor, logits: Tensor, *, impl: str = "fast") -> Tensor:
    """Attention pooling c = Σ_j softmax_j(ℓ_j) x_j over the N positions.

    Args:
        x: ``(B, C, N)`` features.
        logits: ``(B, N)`` logits ℓ_j = W_k x_j.
        impl: ``"fast"`` (softmax once, one bmm with x as it lies) or ``"reference"`` (softmax
            attention with a constant query through the functional core, weights materialised).

    Returns:
        ``(B, C)`` context.
    """
    check_choice("impl", impl, DISPATCH_IMPLS)
    if impl == "reference":
        query = logits.new_ones(logits.shape[0], 1, 1)  # (B, 1, 1): q · k_j = ℓ_j
        key = logits.unsqueeze(-1)  # (B, N, 1)
        value = x.transpose(1, 2)  # (B, N, C)
        c = softmax_aggregate(query, key, value, scale=1.0, impl="reference")  # (B, 1, C)
        return c.squeeze(1)  # (B, C)
    w = torch.softmax(logits, dim=-1, dtype=_compute_dtype(logits.dtype))  # (B, N)
    return torch.bmm(x, w.to(x.dtype).unsqueeze(-1)).squeeze(-1)  # (B, C, 1) -> (B, C)


def masked_attention_pool(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """c = Σ_j softmax_j(wᵀx_j + b) x_j, the logits' 1×1 convolution included (fast path).

    The same function as ``attention_pool(x, conv_mask(x))``, with a backward pass written out:
    the input's gradient, dc ⊗ p + w ⊗ dℓ (the pooling's and the logits' parts), is formed in
    one output, where autograd forms one outer product per part (a K = 1 matrix product and a
    convolution backward) and adds them. The logits and the pooling read x as it lies; the
    softmax runs in (at least) float32. Autocast is off inside: x is read in its own dtype
    (half-precision inputs are accumulated in float32 by the products' kernels).

    Args:
        x: ``(B, C, N)`` features.
        weight: ``(C,)`` logit weights w (``conv_mask``'s).
        bias: ``()`` or ``(1,)`` logit bias b, or None.

    Returns:
        ``(B, C)`` context.
    """
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _MaskedAttentionPool.apply(x, weight, bias)
    with _autocast_off(x.device.type):
        return _masked_pool(x, weight, bias)[0]  # inference: no autograd function to set up


def _masked_pool(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(c, p)``: the context ``(B, C)`` and the weights ``(B, N)`` (autocast off)."""
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    logits = torch.bmm(w.reshape(1, 1, -1).expand(x.shape[0], 1, -1), x).squeeze(1)  # (B, N)
    if bias is not None:
        logits = logits + bias.reshape(())
    p = torch.softmax(logits, dim=-1, dtype=_compute_dtype(x.dtype))  # (B, N)
    px = p if p.dtype == x.dtype else p.to(x.dtype)
    return torch.bmm(x, px.unsqueeze(-1)).squeeze(-1), p  # (B, C)


class _MaskedAttentionPool(torch.autograd.Function):
    """softmax(wᵀx + b)-weighted sum over positions, with its backward in closed form."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        with _autocast_off(x.device.type):
            c, p = _masked_pool(x, weight, bias)  # (B, C), (B, N)
        ctx.save_for_backward(x, weight, p)
        ctx.has_bias = bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        return c

    @staticmethod
    def backward(ctx, dc: Tensor):
        x, weight, p = ctx.saved_tensors
        with _autocast_off(x.device.type):
            dc = dc.to(x.dtype)
            dp = torch.bmm(dc.unsqueeze(1), x).squeeze(1).to(p.dtype)  # (B, N): x_jᵀ dc
            dl = p * (dp - (p * dp).sum(dim=-1, keepdim=True))  # (B, N): softmax backward
            dl_x = dl.to(x.dtype)
            dw = torch.bmm(x, dl_x.unsqueeze(-1)).sum(dim=(0, 2))  # (C,): Σ dℓ_j x_j
            w = weight.to(x.dtype).reshape(1, -1, 1)  # (1, C, 1)
            # dx = dc ⊗ p + w ⊗ dℓ, one (B, C, N) output
            dx = torch.mul(dc.unsqueeze(-1), p.to(x.dtype).unsqueeze(1))
            dx.addcmul_(w, dl_x.unsqueeze(1))
        db = dl.sum().reshape(ctx.bias_shape).to(weight.dtype) if ctx.has_bias else None
        return dx, dw.to(weight.dtype).reshape(weight.shape), db


# One leaf call each under torch.fx symbolic tracing (their dtype and autocast choices read the
# inputs' dtypes and devices, which are proxies there).
torch.fx.wrap("attention_pool")
torch.fx.wrap("masked_attention_pool")


def _attention_weights(logits: Tensor) -> Tensor:
    """softmax over the N positions of ``(B, N)`` logits, in (at least) float32."""
    return torch.softmax(logits, dim=-1, dtype=_compute_dtype(logits.dtype))


def _attention_context(block: nn.Module, x: Tensor) -> Tensor:
    """The attention-pooled context of SNL and GC, ``(B, C)``: the reference through the
    functional core, the fast path through :func:`masked_attention_pool`."""
    if block.impl == "reference":
        logits = block.conv_mask(x).flatten(1)  # (B, N)
        return attention_pool(x.flatten(2), logits, impl="reference")
    conv = block.conv_mask
    return masked_attention_pool(x.flatten(2), conv.weight.reshape(-1), conv.bias)  # (B, C)


def _map_rows(w: Tensor, queries: Sequence[int] | Tensor | None) -> Tensor:
    """The single query-independent row ``(B, 1, N)``, expanded to the asked queries."""
    n = w.shape[-1]
    if queries is None:
        return w
    idx = query_index(n, queries)
    return w.expand(-1, idx.numel(), -1)  # (B, Nq, N), a view


def _layout(owner: nn.Module, size: Sequence[int]) -> AttentionLayout:
    """The query-independent layout of SNL and GC: one row over the N positions."""
    size = tuple(size)
    if len(size) != owner.dims:
        raise ValueError(
            f"{type(owner).__name__}.layout: size must have {owner.dims} dims, got {size}"
        )
    return AttentionLayout.query_independent(size)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled, on devices that have autocast (not on ``meta``); nothing to do (a
    null context, cheaper) when it is off already."""
    if not autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _layer_norm_fp32(
    x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``F.layer_norm`` computed in (at least) float32 with autocast off, returned in x's dtype."""
    dt = _compute_dtype(x.dtype)
    if dt == x.dtype and not autocast_enabled(x.device.type):  # nothing to cast
        return F.layer_norm(x, shape, weight, bias, eps)
    with _autocast_off(x.device.type):
        w = weight.to(dt) if weight is not None else None
        b = bias.to(dt) if bias is not None else None
        out = F.layer_norm(x.to(dt), shape, w, b, eps)
    return out.to(x.dtype)


torch.fx.wrap("_layer_norm_fp32")


class _LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in (at least) float32, also under half-precision autocast.

    Same parameters and state-dict keys as :class:`torch.nn.LayerNorm`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _layer_norm_fp32(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps)


class SimplifiedNonLocal(nn.Module):
    """Simplified non-local block (GCNet §3.2): z_i = x_i + W_v Σ_j softmax_j(W_k x_j) x_j.

    The attention map is one softmax over the N positions, shared by every query.

    Args:
        channels: input and output channels C.
        zero_init: zero W_v's weight and bias, so a fresh block is the identity.
        impl: ``"fast"`` or ``"reference"`` (see :func:`attention_pool`).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Submodules: ``conv_mask`` (W_k, C → 1) and ``conv_value`` (W_v, C → C).
    """

    def __init__(
        self,
        channels: int,
        zero_init: bool = True,
        impl: str = "fast",
        *,
        dims: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "channels", channels)
        check_dims(dims, owner=name)
        check_choice("impl", impl, DISPATCH_IMPLS, owner=name)
        _check_bool(name, "zero_init", zero_init)
        self.channels = channels
        self.dims = dims
        self.zero_init = zero_init
        self.impl = impl
        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.conv_mask = conv(channels, 1, **kw)
        self.conv_value = conv(channels, channels, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_k as mmcv's ``kaiming_init(mode="fan_in")``; W_v default, then zeroed."""
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        self.conv_value.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.conv_value.weight)
            nn.init.zeros_(self.conv_value.bias)

    def _check(self, x: Tensor) -> None:
        check_block_input(self, x)

    def context(self, x: Tensor) -> Tensor:
        """c = Σ_j softmax_j(W_k x_j) x_j: ``(B, C, 1, ...)`` (one 1 per spatial dim)."""
        self._check(x)
        return _unit_dims(_attention_context(self, x), self.dims)  # (B, C, 1, ...)

    def residual(self, x: Tensor) -> Tensor:
        """The branch added to x: W_v c, ``(B, C, 1, ...)`` (the same for every position)."""
        return self.conv_value(self.context(x))

    def forward(self, x: Tensor) -> Tensor:
        """z = x + W_v c, same shape as ``x``."""
        return x + self.residual(x)

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[int] | Tensor | None = None) -> Tensor:
        """softmax_j(W_k x_j), the same for every query.

        Args:
            x: ``(B, C, *S)`` input.
            queries: query positions; the one row is expanded (a view) to ``len(queries)`` rows.

        Returns:
            ``(B, 1, N)``, or ``(B, len(queries), N)``; rows sum to 1. In (at least) float32.
        """
        self._check(x)
        w = _attention_weights(self.conv_mask(x).flatten(1)).unsqueeze(1)  # (B, 1, N)
        return _map_rows(w, queries)

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """Queries and keys of an input of spatial size ``size``: key j is position j, row major.

        Raises:
            ValueError: ``size`` does not have ``dims`` positive entries.
        """
        return _layout(self, size)

    def extra_repr(self) -> str:
        return f"{self.channels}, dims={self.dims}, impl={self.impl!r}"


def _transform(
    dims: int,
    channels: int,
    planes: int,
    layer_norm: bool,
    norm_eps: float,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> nn.Sequential:
    """conv(C → C·r) → LayerNorm([C·r, 1, ...]) → ReLU → conv(C·r → C), mmcv's layout.

    Without layer_norm an ``nn.Identity`` keeps the convs at indices 0 and 3.
    """
    conv = CONV[dims]
    kw = {"kernel_size": 1, "device": device, "dtype": dtype}
    norm: nn.Module = (
        _LayerNormFp32([planes] + [1] * dims, eps=norm_eps, device=device, dtype=dtype)
        if layer_norm
        else nn.Identity()
    )
    return nn.Sequential(
        conv(channels, planes, **kw), norm, nn.ReLU(inplace=True), conv(planes, channels, **kw)
    )


def _transform_tokens(t: nn.Sequential, c: Tensor) -> Tensor:
    """:func:`_transform` applied to a ``(B, C)`` context: the same convolutions, LayerNorm
    (in float32) and ReLU, as matrix products on the vectors."""
    conv1, norm, _, conv2 = t
    h = F.linear(c, conv1.weight.flatten(1), conv1.bias)  # (B, C·r)
    if isinstance(norm, nn.LayerNorm):
        w = norm.weight.reshape(-1) if norm.weight is not None else None
        b = norm.bias.reshape(-1) if norm.bias is not None else None
        h = _layer_norm_fp32(h, (h.shape[-1],), w, b, norm.eps)  # over the C·r channels
    h = F.relu(h)
    return F.linear(h, conv2.weight.flatten(1), conv2.bias)  # (B, C)


def _avg_pool(x: Tensor, dims: int) -> Tensor:
    """Mean over all positions: ``(B, C, *S)`` -> ``(B, C, 1, ...)``."""
    return _unit_dims(x.flatten(2).mean(-1), dims)  # (B, C) -> (B, C, 1, ...)


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


class GlobalContext(nn.Module):
    """Global context block (GCNet §4).

    Context modelling (attention pooling ``conv_mask`` + softmax over all positions, or average
    pooling), a bottleneck transform per fusion, and fusion by addition and/or multiplication:

        z = x ⊙ sigmoid(transform_mul(c)) + transform_add(c)     (the terms that are enabled)

    The last conv of each transform is zero-initialised (weight and bias). A fresh block with
    ``fusion=("add",)`` is therefore the identity; with a multiplication it scales x by
    sigmoid(0) = 1/2, as the official code does.

    Args:
        channels: input and output channels C.
        ratio: bottleneck ratio r of the transforms (1/16 in the paper, 1/4 the larger variant);
            the bottleneck has ``int(C * r)`` channels.
        pooling: ``"att"`` (attention pooling) or ``"avg"`` (global average pooling).
        fusion: a non-empty collection of ``"add"`` and/or ``"mul"``; the multiplication is
            applied first whatever the order given.
        layer_norm: put a LayerNorm([C·r, 1, ...]) after the first conv of each transform
            (computed in float32 under autocast); ``False`` replaces it by ``nn.Identity``.
        zero_init: zero the last conv of each transform.
        impl: ``"fast"`` or ``"reference"`` (see :func:`attention_pool`).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        norm_eps: the LayerNorm's eps: 1e-5 (PyTorch, mmcv, official code) by default, 1e-6 to
            match timm's ``GlobalContext``.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        ratio: float = 1 / 16,
        pooling: str = "att",
        fusion: Sequence[str] | str = ("add",),
        layer_norm: bool = True,
        zero_init: bool = True,
        impl: str = "fast",
        *,
        dims: int = 2,
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "channels", channels)
        planes = _reduced_channels(name, channels, ratio)
        check_choice("pooling", pooling, POOLINGS, owner=name)
        check_dims(dims, owner=name)
        check_choice("impl", impl, DISPATCH_IMPLS, owner=name)
        _check_bool(name, "layer_norm", layer_norm)
        _check_bool(name, "zero_init", zero_init)
        if (
            isinstance(norm_eps, bool)
            or not isinstance(norm_eps, (int, float))
            or not 0 < norm_eps < float("inf")
        ):
            raise ValueError(f"{name}: norm_eps must be a positive number, got {norm_eps!r}")
        if isinstance(fusion, str):
            fusion = (fusion,)
        if not isinstance(fusion, (tuple, list)):
            raise ValueError(
                f"{name}: fusion must be 'add', 'mul' or a collection of them, got {fusion!r}"
            )
        fusion = tuple(fusion)
        for f in fusion:
            check_choice("fusion", f, FUSIONS, owner=name)
        if not fusion or len(set(fusion)) != len(fusion):
            raise ValueError(
                f"{name}: fusion must be a non-empty collection of distinct 'add'/'mul', "
                f"got {fusion!r}"
            )
        self.channels = channels
        self.ratio = ratio
        self.planes = planes
        self.pooling = pooling
        self.fusion = tuple(f for f in ("mul", "add") if f in fusion)  # application order
        self.layer_norm = layer_norm
        self.norm_eps = float(norm_eps)
        self.zero_init = zero_init
        self.impl = impl
        self.dims = dims
        conv = CONV[dims]
        if pooling == "att":
            self.conv_mask = conv(channels, 1, kernel_size=1, device=device, dtype=dtype)
        self.transform_add = (
            _transform(dims, channels, planes, layer_norm, self.norm_eps, device, dtype)
            if "add" in self.fusion
            else None
        )
        self.transform_mul = (
            _transform(dims, channels, planes, layer_norm, self.norm_eps, device, dtype)
            if "mul" in self.fusion
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As mmcv's ContextBlock: kaiming (fan_in) conv_mask, default transforms, last conv 0."""
        if self.pooling == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for t in (self.transform_add, self.transform_mul):
            if t is None:
                continue
            for m in t:
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            if self.zero_init:
                nn.init.zeros_(t[-1].weight)
                nn.init.zeros_(t[-1].bias)

    def _check(self, x: Tensor) -> None:
        check_block_input(self, x)

    def context(self, x: Tensor) -> Tensor:
        """The pooled context c: ``(B, C, 1, ...)`` (one 1 per spatial dim)."""
        self._check(x)
        if self.pooling == "avg":
            return _avg_pool(x, self.dims)
        return _unit_dims(_attention_context(self, x), self.dims)  # (B, C, 1, ...)

    def residual(self, x: Tensor) -> Tensor:
        """The transform output before fusion, ``(B, C, 1, ...)``, the same for every position.

        ``transform_add(c)`` when the block adds, otherwise ``transform_mul(c)`` (before the
        sigmoid).
        """
        c = self.context(x)
        t = self.transform_add if self.transform_add is not None else self.transform_mul
        return t(c)

    def forward(self, x: Tensor) -> Tensor:
        """z = x ⊙ sigmoid(transform_mul(c)) + transform_add(c), same shape as ``x``."""
        if self.impl == "reference":
            c = self.context(x)
            out = x
            if self.transform_mul is not None:
                out = out * torch.sigmoid(self.transform_mul(c))
            if self.transform_add is not None:
                out = out + self.transform_add(c)
            return out
        # fast path: the context as (B, C) and the transforms as matrix products on it (a
        # convolution on a 1×1 map costs more to set up than it computes)
        if self.pooling == "avg":
            self._check(x)
            c = x.flatten(2).mean(-1)  # (B, C)
        else:
            self._check(x)
            c = _attention_context(self, x)  # (B, C)
        out = x
        if self.transform_mul is not None:
            out = out * _unit_dims(
                torch.sigmoid(_transform_tokens(self.transform_mul, c)), self.dims
            )
        if self.transform_add is not None:
            out = out + _unit_dims(_transform_tokens(self.transform_add, c), self.dims)
        return out

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[int] | Tensor | None = None) -> Tensor:
        """The pooling weights, the same for every query: softmax_j(W_k x_j), or 1/N for avg.

        Args:
            x: ``(B, C, *S)`` input.
            queries: query positions; the one row is expanded (a view) to ``len(queries)`` rows.

        Returns:
            ``(B, 1, N)``, or ``(B, len(queries), N)``; rows sum to 1. In (at least) float32.
        """
        self._check(x)
        if self.pooling == "avg":
            n = x[0, 0].numel()
            w = x.new_full((x.shape[0], 1, n), 1.0 / n, dtype=_compute_dtype(x.dtype))  # (B, 1, N)
        else:
            w = _attention_weights(self.conv_mask(x).flatten(1)).unsqueeze(1)  # (B, 1, N)
        return _map_rows(w, queries)

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """Queries and keys of an input of spatial size ``size``: key j is position j, row major.

        Raises:
            ValueError: ``size`` does not have ``dims`` positive entries.
        """
        return _layout(self, size)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, ratio={self.ratio:.4g}, pooling={self.pooling!r}, "
            f"fusion={self.fusion!r}, layer_norm={self.layer_norm}, norm_eps={self.norm_eps:g}, "
            f"dims={self.dims}, "
            f"impl={self.impl!r}"
        )


class SqueezeExcite(nn.Module):
    """Squeeze-excitation block (Hu et al., 2018), as GCNet compares with it.

        z = x ⊙ sigmoid(fc2(ReLU(fc1(mean_j x_j))))

    ``fc1`` and ``fc2`` are 1×1(×1) convolutions with bias (C → int(C·r) → C), default init.

    Args:
        channels: input and output channels C.
        ratio: bottleneck ratio r.
        dims: number of dimensions after (B, C): 1, 2 or 3.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        ratio: float = 1 / 16,
        *,
        dims: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive_int(name, "channels", channels)
        planes = _reduced_channels(name, channels, ratio)
        check_dims(dims, owner=name)
        self.channels = channels
        self.ratio = ratio
        self.planes = planes
        self.dims = dims
        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.fc1 = conv(channels, planes, **kw)
        self.fc2 = conv(planes, channels, **kw)

    def reset_parameters(self) -> None:
        """Default (PyTorch) init of both convolutions."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """z = x ⊙ sigmoid(fc2(ReLU(fc1(mean x)))), same shape as ``x``."""
        check_block_input(self, x)
        m = x.flatten(2).mean(-1)  # (B, C)
        # fc1 and fc2 as matrix products on the (B, C) vector (the 1×1 convolutions' weights)
        h = F.relu(F.linear(m, self.fc1.weight.flatten(1), self.fc1.bias))  # (B, C·r)
        s = F.linear(h, self.fc2.weight.flatten(1), self.fc2.bias)  # (B, C)
        return x * _unit_dims(torch.sigmoid(s), self.dims)

    def extra_repr(self) -> str:
        return f"{self.channels}, ratio={self.ratio:.4g}, dims={self.dims}"
