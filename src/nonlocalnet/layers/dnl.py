"""The disentangled non-local block of Yin, Yao, Cao, Li, Zhang, Lin and Hu, *Disentangled
Non-Local Neural Networks* (ECCV 2020).

The embedded-Gaussian logit splits as q_iᵀk_j = (q_i − μ_q)ᵀ(k_j − μ_k) + μ_qᵀk_j + (terms
constant in j), with μ_q, μ_k the means of the queries and keys over the positions: a *whitened
pairwise* term, which relates two positions, and a *unary* term, the same for every query (the
query-independent map GCNet observed). DNL computes the two as separate softmaxes, the unary one
from its own projection w_m (``conv_mask``, C → 1), and sums them:

    ω_ij = softmax_j((q_i − μ_q)ᵀ(k_j − μ_k) · s / τ)  +  softmax_j(w_mᵀ x_j + b_m)
    y_i  = Σ_j ω_ij g(x_j)
    z_i  = x_i + BN(W_z y_i)

with q = θ(x), k = φ(x), g(x) 1×1(×1) convolutions C → C', the scale s = C'^-1/2
(``use_scale``) and the temperature τ = 0.05 (``temperature``), as mmsegmentation's ``DNLHead``
(the official code's setting). Because Σ_i (q_i − μ_q) = 0, the whitened logits have zero mean
over the queries for every key: the query-independent part of the map is left to the unary term.
Each softmax sums to 1 over j, so the rows of ω sum to 2.

``pairwise="dot_product"`` replaces the first softmax by the whitened dot product divided by the
number of positions, (q_i − μ_q)ᵀ(k_j − μ_k) / N (mmseg's ``mode='dot_product'``; no scale, no
temperature).

Two implementations, exact against each other:

* ``impl="reference"`` materialises ω (B, N, N) as the sum of the two maps and multiplies it with
  g: the formula taken literally.
* ``impl="fast"`` never forms an N×N tensor: the pairwise term is softmax attention on the
  mean-subtracted queries and keys through :func:`nonlocalnet.functional.softmax_aggregate`
  (fused attention; or linear attention q (kᵀ g) / N for the dot product), and the unary term is
  GCNet's attention pooling (:func:`~nonlocalnet.layers.global_context.attention_pool`) of g,
  one C'-vector broadcast to every query.

Parameters follow the project's non-local block (``theta``, ``phi``, ``g``, ``conv_out``,
``norm``) plus ``conv_mask``. An mmseg ``DisentangledNonLocal2d`` checkpoint (its ``dnl_block``)
maps by renaming ``{theta,phi,g}.conv.*`` → ``{theta,phi,g}.*``, ``conv_out.conv.weight`` →
``conv_out.weight`` and ``conv_out.bn.*`` → ``norm.*`` (its ``conv_out`` has no bias when a norm
follows, nor does this one); ``conv_mask`` keeps its name (C → 1, with bias).

This module depends on torch alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, query_index
from nonlocalnet.functional import (
    DISPATCH_IMPLS,
    dot_product_aggregate,
    pairwise_weights,
    softmax_aggregate,
)
from nonlocalnet.layers._dims import (
    BATCH_NORM,
    CONV,
    check_block_input,
    check_dims,
    check_positive_int,
)
from nonlocalnet.layers.global_context import attention_pool
from nonlocalnet.layers.layout import AttentionLayout

__all__ = [
    "DNL_PAIRWISE",
    "DNL_TERMS",
    "DisentangledNonLocal1d",
    "DisentangledNonLocal2d",
    "DisentangledNonLocal3d",
    "DisentangledNonLocalNd",
]

#: pairwise forms of the whitened term (those of mmseg's DNL).
DNL_PAIRWISE = ("embedded_gaussian", "dot_product")
#: what ``attention_map`` returns: ω, its whitened pairwise term, or its unary term.
DNL_TERMS = ("both", "pairwise", "unary")
#: the temperature of mmseg's DNLHead and of the official code.
DEFAULT_TEMPERATURE = 0.05


class DisentangledNonLocalNd(nn.Module):
    """Disentangled non-local block for inputs with ``dims`` dimensions after (B, C).

    :class:`DisentangledNonLocal1d`, :class:`DisentangledNonLocal2d` and
    :class:`DisentangledNonLocal3d` fix ``dims``. Queries and keys are all N positions (all
    T·H·W in 3d).

    Args:
        channels: input and output channels C.
        inner_channels: width C' of θ, φ and g; defaults to ``channels // 2`` (mmseg's
            ``reduction=2``).
        pairwise: ``"embedded_gaussian"`` (paper) or ``"dot_product"`` (whitened dot product
            / N).
        temperature: τ of the whitened softmax, for embedded_gaussian; ``None`` for 0.05.
            Must be left ``None`` for dot_product.
        use_scale: multiply the whitened logits by C'^-1/2 (before dividing by τ), for
            embedded_gaussian; ``None`` for on (mmseg's DNLHead). Must not be True for
            dot_product.
        norm: ``True`` for a BatchNorm after W_z (then W_z has no bias, as mmseg's
            ``conv_out``), ``False`` for none, or a callable ``norm(channels) -> nn.Module``.
        zero_init: start the block as the identity: the norm's weight and bias are zeroed, or,
            without a norm, W_z's weight and bias.
        impl: ``"fast"`` (never an N×N tensor) or ``"reference"`` (ω materialised).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        pairwise: str = "embedded_gaussian",
        temperature: float | None = None,
        use_scale: bool | None = None,
        norm: bool | Callable[[int], nn.Module] = True,
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
        if inner_channels is None:
            inner_channels = max(channels // 2, 1)
        check_positive_int(name, "inner_channels", inner_channels)
        check_choice("pairwise", pairwise, DNL_PAIRWISE)
        check_choice("impl", impl, DISPATCH_IMPLS)
        if pairwise == "embedded_gaussian":
            if temperature is None:
                temperature = DEFAULT_TEMPERATURE
            if (
                isinstance(temperature, bool)
                or not isinstance(temperature, (int, float))
                or not temperature > 0
                or temperature == float("inf")
            ):
                raise ValueError(
                    f"{name}: temperature must be a positive finite number, got {temperature!r}"
                )
            use_scale = True if use_scale is None else bool(use_scale)
            self.scale = (inner_channels**-0.5 if use_scale else 1.0) / temperature
        else:
            if temperature is not None or use_scale:
                raise ValueError(
                    f"{name}: temperature and use_scale apply to pairwise='embedded_gaussian', "
                    f"got temperature={temperature!r}, use_scale={use_scale!r} with "
                    f"pairwise={pairwise!r}"
                )
            self.scale = 1.0

        self.dims = dims
        self.channels = channels
        self.inner_channels = inner_channels
        self.pairwise = pairwise
        self.temperature = temperature
        self.use_scale = use_scale
        self.zero_init = zero_init
        self.impl = impl

        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.theta = conv(channels, inner_channels, **kw)
        self.phi = conv(channels, inner_channels, **kw)
        self.g = conv(channels, inner_channels, **kw)
        self.conv_mask = conv(channels, 1, **kw)  # w_m of the unary term
        if norm is True:
            self.norm: nn.Module | None = BATCH_NORM[dims](channels, device=device, dtype=dtype)
        elif norm is False or norm is None:
            self.norm = None
        elif callable(norm):
            self.norm = norm(channels)
        else:
            raise TypeError(f"{name}: norm must be a bool or a callable, got {type(norm).__name__}")
        self.conv_out = conv(inner_channels, channels, bias=self.norm is None, **kw)  # W_z
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as mmcv's non-local block; zero-init last, so the block is the identity.

        θ, φ, g: normal(0, 0.01), zero bias; W_z: Kaiming normal (fan_out, as mmcv's
        ``ConvModule``); ``conv_mask``: PyTorch's default (mmseg creates it after the init).
        """
        for m in (self.theta, self.phi, self.g):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.kaiming_normal_(self.conv_out.weight, mode="fan_out", nonlinearity="relu")
        if self.conv_out.bias is not None:
            nn.init.zeros_(self.conv_out.bias)
        self.conv_mask.reset_parameters()
        if self.norm is not None and hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()
        if not self.zero_init:
            return
        with torch.no_grad():
            if self.norm is not None and getattr(self.norm, "weight", None) is not None:
                self.norm.weight.zero_()
                if getattr(self.norm, "bias", None) is not None:
                    self.norm.bias.zero_()
            else:
                self.conv_out.weight.zero_()
                if self.conv_out.bias is not None:
                    self.conv_out.bias.zero_()

    def _check(self, x: Tensor) -> None:
        check_block_input(self, x)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Whitened queries and keys, values and unary logits.

        Args:
            x: ``(B, C, *S)`` input.

        Returns:
            ``(q − μ_q, k − μ_k, v, m)``: ``(B, N, C')`` each for the first three, and the
            unary logits m_j = w_mᵀx_j + b_m as ``(B, N)``.
        """
        self._check(x)
        q = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
        k = self.phi(x).flatten(2).transpose(1, 2)  # (B, N, C')
        v = self.g(x).flatten(2).transpose(1, 2)  # (B, N, C')
        q = q - q.mean(dim=1, keepdim=True)  # whitening: μ_q over the positions
        k = k - k.mean(dim=1, keepdim=True)
        m = self.conv_mask(x).flatten(1)  # (B, N)
        return q, k, v, m

    def _pairwise_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The whitened pairwise term ``(B, Nq, N)`` for the given (whitened) query rows."""
        return pairwise_weights(self.pairwise, q, k, scale=self.scale)

    def nonlocal_op(self, x: Tensor) -> Tensor:
        """y = Σ_j ω_ij g(x_j), before W_z: ``(B, C', *S)``."""
        q, k, v, m = self.embed(x)
        if self.impl == "reference":
            unary = torch.softmax(m, dim=-1).unsqueeze(1)  # (B, 1, N)
            omega = self._pairwise_weights(q, k) + unary  # (B, N, N)
            y = torch.bmm(omega, v)  # (B, N, C')
        else:
            if self.pairwise == "embedded_gaussian":
                y = softmax_aggregate(q, k, v, scale=self.scale, impl=self.impl)  # (B, N, C')
            else:
                y = dot_product_aggregate(q, k, v, impl=self.impl)  # (B, N, C')
            u = attention_pool(v.transpose(1, 2), m, impl="fast")  # (B, C')
            y = y + u.unsqueeze(1)  # (B, N, C'): the unary context, the same for every query
        return y.transpose(1, 2).reshape(x.shape[0], self.inner_channels, *x.shape[2:])

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch BN(W_z y), before adding x."""
        z = self.conv_out(self.nonlocal_op(x))
        return self.norm(z) if self.norm is not None else z

    def forward(self, x: Tensor) -> Tensor:
        """z = x + BN(W_z y), same shape as ``x``."""
        return x + self.residual(x)

    @torch.no_grad()
    def attention_map(
        self,
        x: Tensor,
        queries: Sequence[int] | Tensor | None = None,
        term: str = "both",
        chunk_size: int = 1024,
    ) -> Tensor:
        """Rows of ω, or of one of its two terms, computed in chunks of queries.

        Args:
            x: ``(B, C, *S)`` input.
            queries: query positions in [0, N) (row major); all N when omitted.
            term: ``"both"`` (ω: rows sum to 2 for embedded_gaussian), ``"pairwise"`` (the
                whitened term) or ``"unary"`` (the query-independent softmax, the same row for
                every query).
            chunk_size: queries per chunk.

        Returns:
            ``(B, Nq, N)``.

        Raises:
            ValueError: unknown ``term``, a query index out of range, or ``chunk_size`` < 1.
        """
        check_choice("term", term, DNL_TERMS)
        if chunk_size < 1:
            raise ValueError(f"attention_map: chunk_size must be >= 1, got {chunk_size}")
        q, k, _, m = self.embed(x)
        idx = query_index(q.shape[1], queries, q.device)
        unary = torch.softmax(m, dim=-1).unsqueeze(1)  # (B, 1, N)
        if term == "unary":
            return unary.expand(-1, idx.numel(), -1)  # (B, Nq, N), a view
        rows = [self._pairwise_weights(q[:, c], k) for c in idx.split(chunk_size)]
        w = torch.cat(rows, dim=1)  # (B, Nq, N)
        return w if term == "pairwise" else w + unary

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
            f"{self.channels}, inner_channels={self.inner_channels}, dims={self.dims}, "
            f"pairwise={self.pairwise!r}, temperature={self.temperature}, "
            f"scale={self.scale:.4g}, impl={self.impl!r}"
        )


class _FixedDims(DisentangledNonLocalNd):
    """:class:`DisentangledNonLocalNd` with ``dims`` fixed by the class."""

    fixed_dims = 2

    def __init__(self, channels: int, *args: object, **kwargs: object) -> None:
        if "dims" in kwargs:
            raise TypeError(
                f"{type(self).__name__}: dims is fixed to {self.fixed_dims}; "
                f"use DisentangledNonLocalNd(..., dims={kwargs['dims']!r})"
            )
        super().__init__(channels, *args, dims=self.fixed_dims, **kwargs)  # type: ignore[arg-type]


class DisentangledNonLocal1d(_FixedDims):
    """Disentangled non-local block for ``(B, C, L)``. Arguments as
    :class:`DisentangledNonLocalNd`."""

    fixed_dims = 1


class DisentangledNonLocal2d(_FixedDims):
    """Disentangled non-local block for ``(B, C, H, W)`` (mmseg's ``DisentangledNonLocal2d``).
    Arguments as :class:`DisentangledNonLocalNd`."""

    fixed_dims = 2


class DisentangledNonLocal3d(_FixedDims):
    """Disentangled non-local block for ``(B, C, T, H, W)``, over all T·H·W positions.
    Arguments as :class:`DisentangledNonLocalNd`."""

    fixed_dims = 3
