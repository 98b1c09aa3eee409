"""Efficient attention of Shen, Zhang, Zhao, Yi and Li, *Efficient Attention: Attention with Linear
Complexities* (WACV 2021).

Dot-product attention D(Q, K, V) = ρ(Q Kᵀ) V costs O(N²) through its N×M map. Efficient attention
normalises the queries and the keys separately and multiplies right to left:

    E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V)

* ``normalization="softmax"`` (the paper's default): ρ_q is a softmax over the channels of each
  query, ρ_k a softmax over the positions of each key channel. The implied map
  W = ρ_q(Q) ρ_k(K)ᵀ is non-negative and its rows sum to 1 (Σ_j W_ij = Σ_c ρ_q(Q)_ic = 1), so it
  is an attention map, but it is never formed: ρ_k(K)ᵀ V is a d_k × d_v *global context*,
  O((N + M)·d_k·d_v) time and O(d_k·d_v) extra memory.
* ``normalization="scaling"``: ρ_q(Y) = ρ_k(Y) = Y / √n with n = M keys, so that
  E = Q Kᵀ V / M is exactly the non-local block's dot-product form.

``heads`` splits the key and value channels into groups that attend separately (the official
repository's multi-head mechanism, each head normalised on its own d_k = C_k / heads channels);
their outputs are concatenated.

* :func:`efficient_aggregate`: the functional core on token tensors, ``(B, N, C_k)`` queries,
  ``(B, M, C_k)`` keys, ``(B, M, C_v)`` values, in the calling convention of
  :mod:`nonlocalnet.functional`, so the non-local block can use it as a pairwise form.
  ``impl="reference"`` materialises W (the formula read left to right); ``impl="fast"`` computes
  the context ρ_k(K)ᵀ V first and never forms an N×M tensor.
* :class:`EfficientAttention`: the block of the official code, z = x + reprojection(E(Q, K, V))
  with 1×1(×1) convolutions ``queries``, ``keys``, ``values`` and ``reprojection`` (the official
  names, so its checkpoints load as they are); ``reprojection`` is zero-initialised by default
  (the official code keeps PyTorch's default init, ``zero_init=False``), so a fresh block is the
  identity.

This module depends on torch alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, check_tokens, query_index
from nonlocalnet.functional import DISPATCH_IMPLS
from nonlocalnet.layers._dims import CONV, check_block_input, check_dims, check_positive_int
from nonlocalnet.layers.layout import AttentionLayout

__all__ = [
    "NORMALIZATIONS",
    "EfficientAttention",
    "efficient_aggregate",
    "efficient_weights",
]

NORMALIZATIONS = ("softmax", "scaling")


def _check_efficient(
    query: Tensor, key: Tensor, value: Tensor, heads: int, normalization: str
) -> None:
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_positive_int("efficient_aggregate", "heads", heads)
    check_tokens(query, "query")
    check_tokens(key, "key")
    check_tokens(value, "value")
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(
            f"query, key and value must have the same batch size, got "
            f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(
            f"key and value must have the same number of positions M, got "
            f"key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key must have the same channel count, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )
    for name, t in (("query/key", query), ("value", value)):
        if t.shape[2] % heads:
            raise ValueError(
                f"efficient_aggregate: {name} channels ({t.shape[2]}) must be divisible by "
                f"heads ({heads})"
            )


def _heads(t: Tensor, heads: int) -> Tensor:
    """``(B, N, C)`` tokens as ``(B, h, N, C/h)`` heads."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)  # (B, h, N, C/h)


def _normalise(query: Tensor, key: Tensor, heads: int, normalization: str) -> tuple[Tensor, Tensor]:
    """ρ_q(Q) and ρ_k(K) per head: ``(B, h, N, d_k)`` and ``(B, h, M, d_k)``.

    Softmax normalisation runs in (at least) float32 and returns the input dtype.
    """
    q, k = _heads(query, heads), _heads(key, heads)
    if normalization == "scaling":
        s = key.shape[1] ** -0.5
        return q * s, k * s
    acc = torch.promote_types(query.dtype, torch.float32)
    rho_q = torch.softmax(q, dim=-1, dtype=acc).to(query.dtype)  # over the channels of a query
    rho_k = torch.softmax(k, dim=-2, dtype=acc).to(key.dtype)  # over the positions of a channel
    return rho_q, rho_k


def efficient_weights(
    query: Tensor, key: Tensor, *, heads: int = 1, normalization: str = "softmax"
) -> Tensor:
    """The implied map W = ρ_q(Q) ρ_k(K)ᵀ of every head, materialised.

    Args:
        query: ``(B, N, C_k)``.
        key: ``(B, M, C_k)``.
        heads: number of heads (divides C_k).
        normalization: ``"softmax"`` or ``"scaling"`` (see the module docstring).

    Returns:
        ``(B, h, N, M)``; with softmax normalisation every row is non-negative and sums to 1.
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    rho_q, rho_k = _normalise(query, key, heads, normalization)
    return torch.matmul(rho_q, rho_k.transpose(-1, -2))  # (B, h, N, M)


def efficient_aggregate(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    heads: int = 1,
    normalization: str = "softmax",
    impl: str = "fast",
) -> Tensor:
    """E = ρ_q(Q) (ρ_k(K)ᵀ V), head by head, heads concatenated.

    Args:
        query: ``(B, N, C_k)``.
        key: ``(B, M, C_k)``.
        value: ``(B, M, C_v)``.
        heads: number of heads h (divides C_k and C_v).
        normalization: ``"softmax"`` (ρ_q over channels, ρ_k over positions) or ``"scaling"``
            (both divided by √M: the non-local dot product Q Kᵀ V / M).
        impl: ``"fast"`` (context ρ_k(K)ᵀV first: O((N + M)·C_k·C_v / h), no N×M tensor) or
            ``"reference"`` (W = ρ_q(Q)ρ_k(K)ᵀ materialised, then W V).

    Returns:
        ``(B, N, C_v)``.

    Raises:
        ValueError: unknown ``impl``/``normalization``, ``heads`` not dividing the widths,
            mismatched shapes, empty dimensions.
        TypeError: non-tensor or non-floating inputs.
    """
    check_choice("impl", impl, DISPATCH_IMPLS)
    _check_efficient(query, key, value, heads, normalization)
    b, n = query.shape[:2]
    v = _heads(value, heads)  # (B, h, M, d_v)
    if impl == "reference":
        w = efficient_weights(query, key, heads=heads, normalization=normalization)
        y = torch.matmul(w, v)  # (B, h, N, d_v)
    else:
        rho_q, rho_k = _normalise(query, key, heads, normalization)
        context = torch.matmul(rho_k.transpose(-1, -2), v)  # (B, h, d_k, d_v)
        y = torch.matmul(rho_q, context)  # (B, h, N, d_v)
    return y.transpose(1, 2).reshape(b, n, value.shape[2])  # (B, N, C_v)


class EfficientAttention(nn.Module):
    """Efficient attention block: z = x + reprojection(ρ_q(Q) (ρ_k(K)ᵀ V)).

    Q, K, V are 1×1(×1) convolutions of x over all N positions (1d, 2d or 3d inputs, flattened);
    see the module docstring for ρ_q, ρ_k and the heads.

    Args:
        channels: input and output channels C.
        key_channels: width C_k of queries and keys; defaults to ``channels // 2`` (the inner
            width of the non-local block it replaces).
        value_channels: width C_v of the values; defaults to ``key_channels``.
        heads: number of heads (divides C_k and C_v); 1 is the paper's single-head form.
        normalization: ``"softmax"`` (paper) or ``"scaling"`` (= non-local dot product).
        zero_init: zero the reprojection (weight and bias), so a fresh block is the identity;
            ``False`` keeps PyTorch's default init, as the official code.
        impl: ``"fast"`` (global context first, never an N×N tensor) or ``"reference"``.
        dims: number of dimensions after (B, C): 1, 2 or 3.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Submodules: ``queries``, ``keys``, ``values`` (C → C_k, C_k, C_v) and ``reprojection``
    (C_v → C), all with bias, as the official code.
    """

    def __init__(
        self,
        channels: int,
        key_channels: int | None = None,
        value_channels: int | None = None,
        heads: int = 1,
        normalization: str = "softmax",
        zero_init: bool = True,
        impl: str = "fast",
        *,
        dims: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_dims(dims)
        check_positive_int(name, "channels", channels)
        if key_channels is None:
            key_channels = max(channels // 2, 1)
        if value_channels is None:
            value_channels = key_channels
        check_positive_int(name, "key_channels", key_channels)
        check_positive_int(name, "value_channels", value_channels)
        check_positive_int(name, "heads", heads)
        for n, c in (("key_channels", key_channels), ("value_channels", value_channels)):
            if c % heads:
                raise ValueError(f"{name}: {n} ({c}) must be divisible by heads ({heads})")
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_choice("impl", impl, DISPATCH_IMPLS)
        self.channels = channels
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.heads = heads
        self.normalization = normalization
        self.zero_init = zero_init
        self.impl = impl
        self.dims = dims
        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.keys = conv(channels, key_channels, **kw)
        self.queries = conv(channels, key_channels, **kw)
        self.values = conv(channels, value_channels, **kw)
        self.reprojection = conv(value_channels, channels, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init (as the official code), then the reprojection zeroed."""
        for m in (self.keys, self.queries, self.values, self.reprojection):
            m.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.reprojection.weight)
            nn.init.zeros_(self.reprojection.bias)

    def _check(self, x: Tensor) -> None:
        check_block_input(self, x)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query ``(B, N, C_k)``, key ``(B, N, C_k)`` and value ``(B, N, C_v)`` tokens."""
        self._check(x)
        q = self.queries(x).flatten(2).transpose(1, 2)  # (B, N, C_k)
        k = self.keys(x).flatten(2).transpose(1, 2)  # (B, N, C_k)
        v = self.values(x).flatten(2).transpose(1, 2)  # (B, N, C_v)
        return q, k, v

    def attend(self, x: Tensor) -> Tensor:
        """E(Q, K, V) before the reprojection: ``(B, C_v, *S)``."""
        q, k, v = self.embed(x)
        e = efficient_aggregate(
            q, k, v, heads=self.heads, normalization=self.normalization, impl=self.impl
        )  # (B, N, C_v)
        return e.transpose(1, 2).reshape(x.shape[0], self.value_channels, *x.shape[2:])

    def residual(self, x: Tensor) -> Tensor:
        """The branch added to x: reprojection(E), ``(B, C, *S)``."""
        return self.reprojection(self.attend(x))

    def forward(self, x: Tensor) -> Tensor:
        """z = x + reprojection(E), same shape as ``x``."""
        return x + self.residual(x)

    @torch.no_grad()
    def attention_map(
        self,
        x: Tensor,
        queries: Sequence[int] | Tensor | None = None,
        head: int | None = None,
    ) -> Tensor:
        """Rows of the implied map W = ρ_q(Q) ρ_k(K)ᵀ (formed only for the asked queries).

        Args:
            x: ``(B, C, *S)`` input.
            queries: query positions in [0, N) (row major); all N when omitted.
            head: the head whose map to return; ``None`` averages the heads (the map itself
                when ``heads == 1``).

        Returns:
            ``(B, Nq, N)``; with softmax normalisation the rows are non-negative and sum to 1.

        Raises:
            ValueError: a query or head index out of range.
        """
        q, k, _ = self.embed(x)
        idx = query_index(q.shape[1], queries, q.device)
        if head is not None and (
            isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.heads
        ):
            raise ValueError(
                f"attention_map: head must be an int in [0, {self.heads}) or None, got {head!r}"
            )
        rho_q, rho_k = _normalise(q, k, self.heads, self.normalization)
        w = torch.matmul(rho_q[:, :, idx], rho_k.transpose(-1, -2))  # (B, h, Nq, N)
        return w.mean(dim=1) if head is None else w[:, head]

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """Queries and keys of an input of spatial size ``size``: all positions, row major.

        Raises:
            ValueError: ``size`` does not have ``dims`` positive entries.
        """
        size = tuple(size)
        if len(size) != self.dims:
            raise ValueError(
                f"{type(self).__name__}.layout: size must have {self.dims} dims, got {size}"
            )
        return AttentionLayout.pairwise(size)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, key_channels={self.key_channels}, "
            f"value_channels={self.value_channels}, heads={self.heads}, "
            f"normalization={self.normalization!r}, dims={self.dims}, impl={self.impl!r}"
        )
