"""Asymmetric non-local blocks of Zhu et al., *Asymmetric Non-local Neural Networks for Semantic
Segmentation* (ICCV 2019).

Queries keep all N positions; keys and values are sampled by a spatial pyramid of adaptive average
poolings (bins 1, 3, 6, 8: S = 1 + 9 + 36 + 64 = 110 anchors), so the attention

    y_i = Σ_s softmax_s(d^-1/2 · q_iᵀ k_s) v_s,   s = 1..S

costs O(N·S) instead of O(N²). The fast path is fused attention through
:func:`nonlocalnet.functional.softmax_aggregate` (``impl="fast"``); the reference path materialises
the N×S weights (``impl="reference"``).

* :class:`PyramidPooling`: the sampler, ``(B, C, *S) -> (B, C, S)``.
* :class:`APNB` (self attention): query and key share one projection (conv + BN + ReLU, as in the
  official code; ``share_query_key=False`` gives two, as in the paper's figure); fusion
  concat [context, x] → conv → BN → ReLU → dropout.
* :class:`AFNB` (fusion): queries from the high-level map (stage 5), keys and values from the
  low-level map (stage 4); fusion concat [context, high] → conv → BN → dropout.

The pyramid pooling averages in (at least) float32 and casts back: a float16 average over
thousands of positions (3d maps) would overflow. The forward passes trace with :mod:`torch.fx`
(``create_feature_extractor``): the input checks stand aside while tracing, and the pooling and
the attention are leaf calls.

Submodule names follow the official code (``f_query``, ``f_key``, ``f_value``; its ``W`` is
``conv_out`` here, its ``conv_bn_dropout`` is ``fusion``), so official checkpoints map by renaming
``stages.0.W`` → ``conv_out`` and ``conv_bn_dropout`` → ``fusion``.

This module depends on torch alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, check_feature_map, is_tracing, query_index
from nonlocalnet.functional import DISPATCH_IMPLS, pairwise_weights, softmax_aggregate
from nonlocalnet.layers._dims import (
    ADAPTIVE_AVG_POOL,
    BATCH_NORM,
    CONV,
    DROPOUT,
    check_batch_norm_values,
    check_dims,
    check_dropout,
    check_positive_int,
    parameter_placement,
)
from nonlocalnet.layers.layout import AttentionLayout, spatial_size

__all__ = ["AFNB", "APNB", "PyramidPooling"]

DEFAULT_BINS = (1, 3, 6, 8)


def _pyramid_samples(x: Tensor, sizes: Sequence[Sequence[int]], dims: int) -> Tensor:
    """Adaptive average poolings of ``x`` to each size, flattened and concatenated: ``(B, C, S)``.

    Averaged in (at least) float32, so that half-precision sums over large windows stay finite;
    returned in x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    pool = ADAPTIVE_AVG_POOL[dims]
    xa = x.to(acc)
    pooled = [pool(xa, tuple(s)).flatten(2) for s in sizes]  # (B, C, Π s) each
    return torch.cat(pooled, dim=2).to(x.dtype)  # (B, C, S)


# Leaf calls under torch.fx symbolic tracing: the dtype choices and the attention kernel's
# dispatch read dtypes and devices, which are proxies there.
torch.fx.wrap("_pyramid_samples")
torch.fx.wrap("softmax_aggregate")


class PyramidPooling(nn.Module):
    """Pyramid sampling: adaptive average pooling at each bin size, flattened and concatenated.

    2d: each bin b gives b×b samples, S = Σ b² (110 for the default bins), for any H×W (maps
    smaller than a bin are sampled with overlapping windows). 1d: b samples along L, S = Σ b.
    3d: the bins apply in space; ``pool_time=False`` keeps the T frames (S = T·Σ b²),
    ``pool_time=True`` pools time to 1 (S = Σ b²).

    Args:
        bins: pyramid bin sizes.
        dims: number of dimensions after (B, C): 1, 2 or 3.
        pool_time: for 3d inputs, average over time as well.
    """

    def __init__(
        self, bins: Sequence[int] = DEFAULT_BINS, *, dims: int = 2, pool_time: bool = False
    ) -> None:
        super().__init__()
        check_dims(dims, owner="PyramidPooling")
        if isinstance(bins, (int, str)) or not isinstance(bins, Sequence) or len(bins) == 0:
            raise ValueError(f"PyramidPooling: bins must be a non-empty sequence, got {bins!r}")
        for b in bins:
            check_positive_int("PyramidPooling", "each bin", b)
        if not isinstance(pool_time, bool):
            raise TypeError(f"PyramidPooling: pool_time must be a bool, got {pool_time!r}")
        self.bins = tuple(bins)
        self.dims = dims
        self.pool_time = pool_time

    def output_sizes(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """The output size of each adaptive pooling, in order, for an input of size ``size``.

        ``(b,)`` in 1d, ``(b, b)`` in 2d, ``(T, b, b)`` (or ``(1, b, b)`` with pool_time) in 3d.
        """
        size = tuple(size)
        if len(size) != self.dims:
            raise ValueError(f"PyramidPooling: size must have {self.dims} dims, got {tuple(size)}")
        if self.dims == 3:
            t = 1 if self.pool_time else size[0]
            return [(t, b, b) for b in self.bins]
        return [(b,) * self.dims for b in self.bins]

    def num_samples(self, size: Sequence[int]) -> int:
        """S for an input of spatial size ``size`` (only T matters, for 3d with pool_time off)."""
        return sum(math.prod(s) for s in self.output_sizes(size))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S)`` -> ``(B, C, S)`` samples, bins in order, each flattened row major.

        Averaged in (at least) float32, returned in x's dtype.
        """
        check_feature_map(x, spatial_dims=self.dims, channels=None, owner="PyramidPooling")
        sizes = self.output_sizes(spatial_size(x, self.dims))
        return _pyramid_samples(x, sizes, self.dims)  # (B, C, S)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, dims={self.dims}, pool_time={self.pool_time}"


def _conv_bn_relu(
    dims: int, c_in: int, c_out: int, device: torch.device | str | None, dtype: torch.dtype | None
) -> nn.Sequential:
    return nn.Sequential(
        CONV[dims](c_in, c_out, kernel_size=1, device=device, dtype=dtype),
        BATCH_NORM[dims](c_out, device=device, dtype=dtype),
        nn.ReLU(inplace=True),
    )


class _PyramidAttention(nn.Module):
    """Shared machinery: projections, pyramid sampling and the scaled softmax over S samples."""

    dims: int
    key_channels: int
    value_channels: int
    impl: str
    zero_init: bool
    f_query: nn.Module
    f_key: nn.Module
    f_value: nn.Module
    conv_out: nn.Module
    pyramid: PyramidPooling

    def _setup(
        self,
        widths: dict[str, int],
        *,
        dropout: float,
        zero_init: bool,
        impl: str,
        dims: int,
    ) -> None:
        """Validate and store the constructor arguments both blocks share."""
        name = type(self).__name__
        for n, v in widths.items():
            check_positive_int(name, n, v)
        check_dropout(name, dropout)
        check_dims(dims, owner=name)
        check_choice("impl", impl, DISPATCH_IMPLS, owner=name)
        if not isinstance(zero_init, bool):
            raise TypeError(f"{name}: zero_init must be a bool, got {zero_init!r}")
        for n, v in widths.items():
            setattr(self, n, v)
        self.zero_init = zero_init
        self.impl = impl
        self.dims = dims

    def reset_parameters(self) -> None:
        """PyTorch defaults (as the official code), then ``conv_out`` zeroed."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @property
    def scale(self) -> float:
        """The logit scale d^-1/2, d = key_channels."""
        return self.key_channels**-0.5

    def _layout(self, low_size: Sequence[int], high_size: Sequence[int]) -> AttentionLayout:
        low_size, high_size = tuple(low_size), tuple(high_size)
        for n, size in (("low_size", low_size), ("high_size", high_size)):
            if len(size) != self.dims:
                raise ValueError(
                    f"{type(self).__name__}.layout: {n} must have {self.dims} dims, got {size}"
                )
        return AttentionLayout.pyramid(high_size, low_size, self.pyramid.output_sizes(low_size))

    def _embed(self, low: Tensor, high: Tensor, shared: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Query tokens of ``high``, pyramid-sampled key/value tokens of ``low``."""
        lay = self._layout(spatial_size(low, self.dims), spatial_size(high, self.dims))
        key_map = self.f_key(low)  # (B, K, *S_low)
        query_map = key_map if shared else self.f_query(high)  # (B, K, *S_high)
        q = lay.fold(query_map)  # (B, N, K)
        k = lay.fold_keys(self.pyramid(key_map))  # (B, S, K)
        v = lay.fold_keys(self.pyramid(self.f_value(low)))  # (B, S, V)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, batch: int, lay: AttentionLayout) -> Tensor:
        y = softmax_aggregate(q, k, v, scale=self.scale, impl=self.impl)  # (B, N, V)
        return lay.unfold(y, batch)  # (B, V, *S)

    def _map(self, q: Tensor, k: Tensor, queries: Sequence[int] | Tensor | None) -> Tensor:
        idx = query_index(q.shape[1], queries, q.device)
        dtype = torch.promote_types(q.dtype, torch.float32)
        return pairwise_weights("gaussian", q[:, idx], k, scale=self.scale, dtype=dtype)

    def _check_map(self, x: Tensor, channels: int, name: str) -> None:
        dtype, device = parameter_placement(self)
        owner = type(self).__name__
        check_feature_map(
            x,
            spatial_dims=self.dims,
            channels=channels,
            name=name,
            owner=owner,
            dtype=dtype,
            device=device,
        )
        if not is_tracing(x):
            check_batch_norm_values(self, x, owner)


class APNB(_PyramidAttention):
    """Asymmetric pyramid non-local block (self attention).

        context = conv_out(Σ_s softmax_s(d^-1/2 q_iᵀ k_s) v_s)      (conv_out zero-initialised)
        out     = Dropout(ReLU(BN(conv([context, x]))))

    Args:
        channels: input channels C (conv_out maps the attention back to C).
        out_channels: output channels of the fusion; defaults to ``channels``.
        key_channels: width d of queries and keys.
        value_channels: width of the values.
        bins: pyramid bin sizes (S = 110 for the default).
        share_query_key: one projection (conv + BN + ReLU) for queries and keys (official code);
            ``False`` gives separate ``f_query`` and ``f_key``.
        dropout: channel dropout probability after the fusion.
        zero_init: zero ``conv_out`` (weight and bias).
        impl: ``"fast"`` (fused attention) or ``"reference"`` (N×S weights materialised).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        pool_time: for 3d inputs, pool time to 1 in the pyramid (default keeps T).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        key_channels: int = 256,
        value_channels: int = 256,
        bins: Sequence[int] = DEFAULT_BINS,
        share_query_key: bool = True,
        dropout: float = 0.05,
        zero_init: bool = True,
        impl: str = "fast",
        *,
        dims: int = 2,
        pool_time: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if out_channels is None:
            out_channels = channels
        if not isinstance(share_query_key, bool):
            raise TypeError(f"APNB: share_query_key must be a bool, got {share_query_key!r}")
        self._setup(
            {
                "channels": channels,
                "out_channels": out_channels,
                "key_channels": key_channels,
                "value_channels": value_channels,
            },
            dropout=dropout,
            zero_init=zero_init,
            impl=impl,
            dims=dims,
        )
        self.share_query_key = share_query_key
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        conv = CONV[dims]
        self.pyramid = PyramidPooling(bins, dims=dims, pool_time=pool_time)
        self.f_key = _conv_bn_relu(dims, channels, key_channels, device, dtype)
        self.f_query = (
            self.f_key
            if share_query_key
            else _conv_bn_relu(dims, channels, key_channels, device, dtype)
        )
        self.f_value = conv(channels, value_channels, **kw)
        self.conv_out = conv(value_channels, channels, **kw)
        self.fusion = nn.Sequential(
            conv(2 * channels, out_channels, **kw),
            BATCH_NORM[dims](out_channels, device=device, dtype=dtype),
            nn.ReLU(inplace=True),
            DROPOUT[dims](dropout),
        )
        self.reset_parameters()

    def _check(self, x: Tensor) -> None:
        self._check_map(x, self.channels, "input")

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query ``(B, N, d)``, key ``(B, S, d)`` and value ``(B, S, V)`` tokens."""
        self._check(x)
        return self._embed(x, x, self.share_query_key)

    def context(self, x: Tensor) -> Tensor:
        """The attention output before conv_out: ``(B, V, *S)``."""
        q, k, v = self.embed(x)
        return self._attend(q, k, v, x.shape[0], self.layout(spatial_size(x, self.dims)))

    def residual(self, x: Tensor) -> Tensor:
        """conv_out(context): the output before the fusion, ``(B, C, *S)``."""
        return self.conv_out(self.context(x))

    def forward(self, x: Tensor) -> Tensor:
        """Fusion of [conv_out(context), x]: ``(B, out_channels, *S)``."""
        return self.fusion(torch.cat([self.residual(x), x], dim=1))  # (B, 2C, *S)

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[int] | Tensor | None = None) -> Tensor:
        """softmax_s(d^-1/2 q_iᵀ k_s) for the given query positions (all N when omitted).

        Returns:
            ``(B, Nq, S)``; rows sum to 1. In (at least) float32.
        """
        q, k, _ = self.embed(x)
        return self._map(q, k, queries)

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """Queries and keys of an input of spatial size ``size``.

        Queries are the N positions, row major; key s is an adaptive-pooling cell of the
        pyramid (bins in order), the cells listed by ``key_cells()``.

        Raises:
            ValueError: ``size`` does not have ``dims`` positive entries.
        """
        return self._layout(size, size)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, out_channels={self.out_channels}, key_channels={self.key_channels}, "
            f"value_channels={self.value_channels}, share_query_key={self.share_query_key}, "
            f"dims={self.dims}, impl={self.impl!r}"
        )


class AFNB(_PyramidAttention):
    """Asymmetric fusion non-local block: queries from ``high``, keys/values from ``low``.

        context = conv_out(Σ_s softmax_s(d^-1/2 q_iᵀ k_s) v_s)      (conv_out zero-initialised)
        out     = Dropout(BN(conv([context, high])))

    The two maps may differ in spatial size; the output has the size of ``high``.

    Args:
        low_channels: channels of the low-level map (stage 4; keys and values).
        high_channels: channels of the high-level map (stage 5; queries).
        out_channels: output channels (of conv_out and of the fusion).
        key_channels: width d of queries and keys.
        value_channels: width of the values.
        bins: pyramid bin sizes (S = 110 for the default).
        dropout: channel dropout probability after the fusion.
        zero_init: zero ``conv_out`` (weight and bias).
        impl: ``"fast"`` (fused attention) or ``"reference"`` (N×S weights materialised).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        pool_time: for 3d inputs, pool time to 1 in the pyramid (default keeps T).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int,
        key_channels: int = 256,
        value_channels: int = 256,
        bins: Sequence[int] = DEFAULT_BINS,
        dropout: float = 0.05,
        zero_init: bool = True,
        impl: str = "fast",
        *,
        dims: int = 2,
        pool_time: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(
            {
                "low_channels": low_channels,
                "high_channels": high_channels,
                "out_channels": out_channels,
                "key_channels": key_channels,
                "value_channels": value_channels,
            },
            dropout=dropout,
            zero_init=zero_init,
            impl=impl,
            dims=dims,
        )
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        conv = CONV[dims]
        self.pyramid = PyramidPooling(bins, dims=dims, pool_time=pool_time)
        self.f_key = _conv_bn_relu(dims, low_channels, key_channels, device, dtype)
        self.f_query = _conv_bn_relu(dims, high_channels, key_channels, device, dtype)
        self.f_value = conv(low_channels, value_channels, **kw)
        self.conv_out = conv(value_channels, out_channels, **kw)
        self.fusion = nn.Sequential(
            conv(out_channels + high_channels, out_channels, **kw),
            BATCH_NORM[dims](out_channels, device=device, dtype=dtype),
            DROPOUT[dims](dropout),
        )
        self.reset_parameters()

    def _check(self, low: Tensor, high: Tensor) -> None:
        self._check_map(low, self.low_channels, "low")
        self._check_map(high, self.high_channels, "high")
        if is_tracing(low, high):
            return
        if low.shape[0] != high.shape[0]:
            raise ValueError(
                f"AFNB: low and high must have the same batch size, got {low.shape[0]} "
                f"(low {tuple(low.shape)}) and {high.shape[0]} (high {tuple(high.shape)})"
            )

    def embed(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query ``(B, N_high, d)``, key ``(B, S, d)`` and value ``(B, S, V)`` tokens."""
        self._check(low, high)
        return self._embed(low, high, shared=False)

    def context(self, low: Tensor, high: Tensor) -> Tensor:
        """The attention output before conv_out: ``(B, V, *S_high)``."""
        q, k, v = self.embed(low, high)
        lay = self.layout(spatial_size(low, self.dims), spatial_size(high, self.dims))
        return self._attend(q, k, v, high.shape[0], lay)

    def residual(self, low: Tensor, high: Tensor) -> Tensor:
        """conv_out(context): the output before the fusion, ``(B, out_channels, *S_high)``."""
        return self.conv_out(self.context(low, high))

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """Fusion of [conv_out(context), high]: ``(B, out_channels, *S_high)``."""
        return self.fusion(torch.cat([self.residual(low, high), high], dim=1))

    @torch.no_grad()
    def attention_map(
        self, low: Tensor, high: Tensor, queries: Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """softmax_s(d^-1/2 q_iᵀ k_s) for the given positions of ``high`` (all when omitted).

        Returns:
            ``(B, Nq, S)``; rows sum to 1. In (at least) float32.
        """
        q, k, _ = self.embed(low, high)
        return self._map(q, k, queries)

    def layout(self, low_size: Sequence[int], high_size: Sequence[int]) -> AttentionLayout:
        """Queries and keys for a low-level map of size ``low_size`` and a high one of ``high_size``.

        Queries are the positions of ``high``, row major; key s is an adaptive-pooling cell of
        the pyramid over ``low`` (bins in order), the cells listed by ``key_cells()`` as
        positions of ``low``.

        Raises:
            ValueError: a size that does not have ``dims`` positive entries.
        """
        return self._layout(low_size, high_size)

    def extra_repr(self) -> str:
        return (
            f"low_channels={self.low_channels}, high_channels={self.high_channels}, "
            f"out_channels={self.out_channels}, key_channels={self.key_channels}, "
            f"value_channels={self.value_channels}, dims={self.dims}, impl={self.impl!r}"
        )
