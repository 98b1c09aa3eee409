"""Criss-cross attention of Huang, Wang, Huang, Huang, Wei and Liu, *CCNet: Criss-Cross Attention
for Semantic Segmentation* (ICCV 2019).

Each position u attends only to the positions of its row and its column, Ω_u (H + W − 1 keys in
2d: the position itself is counted once), with one softmax over all of them:

    A_{u,j} = softmax_{j∈Ω_u}(q_uᵀ k_j)          (no logit scale, as the paper and mmcv)
    y_u     = Σ_{j∈Ω_u} A_{u,j} v_j
    x'_u    = γ · y_u + x_u                      (γ a learnt scalar, 0 at init)

q, k are 1×1 convolutions C → C/8, v a 1×1 convolution C → C. The module is applied R = 2 times
with the same weights (*recurrent* criss-cross attention), so information reaches every position
through two hops: ``forward(x)`` is x'' = CCA(CCA(x)).

Dimensions: the rule "attend along every axis line through u" serves every ``dims``. In 2d it is
the paper's (row and column); in 3d each position attends along its three lines (T + H + W − 2
keys); in 1d the single line is the whole sequence, so the block is plain softmax attention over
all L positions.

Two implementations of the attention, exact against each other:

* ``impl="reference"`` follows mmcv's ``CrissCrossAttention`` literally: per-axis energies, −∞ on
  the self position of every axis but the last (mmcv masks the diagonal of the column energy, so
  the self position is counted once, in the row), concatenated into one ``(B, *S, ΣS_d)``
  tensor, one softmax over it, then split and aggregated per axis.
* ``impl="fast"`` never forms that joint tensor: it runs one softmax attention per axis (the
  row attention and the column attention, each over its own line) and merges them exactly
  through their log-sum-exps, L_u = log Σ_d exp(L_u^d), y_u = Σ_d exp(L_u^d − L_u) · y_u^d. Its
  backward pass recomputes each axis's logits from the saved L (as flash attention does), so it
  keeps only O(N·C) for backward and holds one axis's logits (N × S_d, less than the C-wide
  activations whenever S_d < C) at a time. No custom op: plain batched matrix products. In 1d
  the one line is the whole sequence, and the fast path is fused softmax attention
  (:func:`nonlocalnet.functional.softmax_aggregate`), which never forms the L×L map.

Parameters follow mmcv's layout (``query_conv``, ``key_conv``, ``value_conv``, ``gamma.scale``),
so its checkpoints load as they are; the official CCNet code stores γ as a ``(1,)`` parameter
``gamma`` (rename to ``gamma.scale`` and reshape to ``()``).

This module depends on torch alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, query_index
from nonlocalnet.functional import DISPATCH_IMPLS, softmax_aggregate
from nonlocalnet.layers._dims import CONV, check_block_input, check_dims, check_positive_int
from nonlocalnet.layers.layout import AttentionLayout

__all__ = [
    "CrissCrossAttention",
    "Scale",
    "criss_cross_aggregate",
    "criss_cross_weights",
    "num_criss_cross_keys",
]


def num_criss_cross_keys(size: Sequence[int]) -> int:
    """Keys per position: Σ_d S_d − (D − 1) (H + W − 1 in 2d)."""
    return sum(size) - (len(size) - 1)


def _check_maps(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"criss_cross: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"criss_cross: {name} must have a floating-point dtype, got {t.dtype}")
    if query.dim() < 3 or query.dim() > 5:
        raise ValueError(
            f"criss_cross: query must be a (B, C, *S) map with 1 to 3 spatial dims, "
            f"got shape {tuple(query.shape)}"
        )
    if key.shape != query.shape:
        raise ValueError(
            f"criss_cross: key must have the shape of query {tuple(query.shape)}, "
            f"got {tuple(key.shape)}"
        )
    if (
        value.dim() != query.dim()
        or value.shape[0] != query.shape[0]
        or (value.shape[2:] != query.shape[2:])
    ):
        raise ValueError(
            f"criss_cross: value must be (B, C_v, *S) with B and S of query "
            f"{tuple(query.shape)}, got {tuple(value.shape)}"
        )


# -- reference: mmcv's formulation, for any number of axes ----------------------------------


def _energy(query: Tensor, key: Tensor, d: int) -> Tensor:
    """Logits of every position against its line along axis d: ``(B, *S, S_d)``."""
    dims = query.dim() - 2
    q = query.movedim(2 + d, -1)  # (B, C', *S without d, S_d)
    k = key.movedim(2 + d, -1)  # (B, C', *S without d, S_d)
    e = torch.einsum("bc...i,bc...j->b...ij", q, k)  # (B, *S without d, S_d (query), S_d (key))
    if d < dims - 1:
        # The self position is counted once, in the last axis: −∞ on this axis's diagonal
        # (mmcv's NEG_INF_DIAG on the column energy).
        n = e.shape[-1]
        e = e + torch.diag(e.new_full((n,), float("-inf")))
    return e.movedim(-2, 1 + d)  # (B, *S, S_d)


def criss_cross_weights(query: Tensor, key: Tensor) -> Tensor:
    """The joint softmax over every position's lines, materialised (mmcv's ``attn``).

    Args:
        query: ``(B, C', *S)`` query map.
        key: ``(B, C', *S)`` key map.

    Returns:
        ``(B, *S, ΣS_d)``: for each position, its weights over the S_0 positions of its line
        along axis 0, then along axis 1, ...; the self position appears in every axis but is
        masked (weight exactly 0) in all but the last. Each row sums to 1.
    """
    dims = query.dim() - 2
    energy = torch.cat([_energy(query, key, d) for d in range(dims)], dim=-1)  # (B, *S, ΣS_d)
    return torch.softmax(energy, dim=-1)


def _reference(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    dims = query.dim() - 2
    attn = criss_cross_weights(query, key)  # (B, *S, ΣS_d)
    out = None
    offset = 0
    for d in range(dims):
        n = query.shape[2 + d]
        a = attn[..., offset : offset + n].movedim(1 + d, -2)  # (B, *S without d, S_d, S_d)
        v = value.movedim(2 + d, -1)  # (B, C_v, *S without d, S_d)
        o = torch.einsum("b...ij,bc...j->bc...i", a, v).movedim(-1, 2 + d)  # (B, C_v, *S)
        out = o if out is None else out + o
        offset += n
    return out


# -- fast: one softmax attention per axis, merged by log-sum-exp -----------------------------


def _lines(t: Tensor, d: int) -> Tensor:
    """``(B, C, *S)`` as the lines along axis d: ``(B·Π_{e≠d} S_e, S_d, C)``, contiguous."""
    t = t.movedim(1, -1).movedim(1 + d, -2)  # (B, *S without d, S_d, C)
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _unlines(y: Tensor, d: int, shape: Sequence[int]) -> Tensor:
    """Undo :func:`_lines`: ``(G, S_d, C)`` back to ``(B, C, *S)`` (``shape`` with C = y's)."""
    b, _, *size = shape
    others = [s for e, s in enumerate(size) if e != d]
    y = y.reshape(b, *others, size[d], y.shape[-1])  # (B, *S without d, S_d, C)
    return y.movedim(-2, 1 + d).movedim(-1, 1)  # (B, C, *S)


def _line_logits(q: Tensor, k: Tensor, masked: bool) -> Tensor:
    """``(G, S_d, S_d)`` logits of each line; −∞ on the self position when ``masked``."""
    s = torch.bmm(q, k.transpose(1, 2))  # (G, S_d, S_d)
    if masked:
        eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
        s = s.masked_fill(eye, float("-inf"))
    return s


class _CrissCrossAttention(torch.autograd.Function):
    """Exact joint softmax over the axis lines; backward recomputes each axis's logits."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor):
        out_dtype = value.dtype
        acc = torch.promote_types(query.dtype, torch.float32)
        dims = query.dim() - 2
        shape_v = value.shape
        with torch.autocast(query.device.type, enabled=False):
            q, k, v = query.to(acc), key.to(acc), value.to(acc)
            outs, lses = [], []
            for d in range(dims):
                s = _line_logits(_lines(q, d), _lines(k, d), masked=d < dims - 1)
                lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (G, S_d, 1)
                # a masked line of one position has no key at all: its weights are 0
                lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
                p = torch.exp(s - lse_safe)  # (G, S_d, S_d), normalised within the line
                outs.append(_unlines(torch.bmm(p, _lines(v, d)), d, shape_v))  # (B, C_v, *S)
                lses.append(_unlines(lse, d, (shape_v[0], 1, *shape_v[2:])))  # (B, 1, *S)
                del s, p  # one axis's logits at a time
            total = torch.logsumexp(torch.stack(lses), dim=0)  # (B, 1, *S): joint L
            out = sum(torch.exp(l - total) * o for l, o in zip(lses, outs, strict=True))
        ctx.save_for_backward(q, k, v, out, total)
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, total = ctx.saved_tensors
        dims = q.dim() - 2
        with torch.autocast(q.device.type, enabled=False):
            do = grad_out.to(q.dtype)
            delta = (do * out).sum(dim=1, keepdim=True)  # (B, 1, *S): rowsum(dO ∘ O)
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            for d in range(dims):
                q_l, k_l, v_l, do_l = _lines(q, d), _lines(k, d), _lines(v, d), _lines(do, d)
                s = _line_logits(q_l, k_l, masked=d < dims - 1)
                p = torch.exp(s - _lines(total, d))  # (G, S_d, S_d): joint weights
                dv = dv + _unlines(torch.bmm(p.transpose(1, 2), do_l), d, v.shape)
                ds = (torch.bmm(do_l, v_l.transpose(1, 2)) - _lines(delta, d)) * p  # dL/ds
                dq = dq + _unlines(torch.bmm(ds, k_l), d, q.shape)
                dk = dk + _unlines(torch.bmm(ds.transpose(1, 2), q_l), d, k.shape)
                del s, p, ds
        q_t, k_t, v_t = ctx.dtypes
        return dq.to(q_t), dk.to(k_t), dv.to(v_t)


def criss_cross_aggregate(
    query: Tensor, key: Tensor, value: Tensor, *, impl: str = "fast"
) -> Tensor:
    """y_u = Σ_{j∈Ω_u} softmax_{j∈Ω_u}(q_uᵀ k_j) v_j over the axis lines through u.

    Args:
        query: ``(B, C', *S)`` query map (1 to 3 spatial dims).
        key: ``(B, C', *S)`` key map.
        value: ``(B, C_v, *S)`` value map.
        impl: ``"fast"`` (per-axis attentions merged by log-sum-exp) or ``"reference"``
            (mmcv's joint ``(B, *S, ΣS_d)`` softmax).

    Returns:
        ``(B, C_v, *S)``.

    Raises:
        ValueError: unknown ``impl`` or mismatched shapes.
        TypeError: non-tensor or non-floating inputs.
    """
    check_choice("impl", impl, DISPATCH_IMPLS)
    _check_maps(query, key, value)
    if impl == "reference":
        return _reference(query, key, value)
    if query.dim() == 3:
        # One axis: the line is the whole sequence, plain softmax attention; fused, no L×L map.
        y = softmax_aggregate(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=1.0, impl=impl
        )  # (B, L, C_v)
        return y.transpose(1, 2)  # (B, C_v, L)
    return _CrissCrossAttention.apply(query, key, value)


class Scale(nn.Module):
    """Multiply by a learnt scalar ``scale`` (mmcv's ``Scale``: a 0-d parameter)."""

    def __init__(
        self,
        scale: float = 1.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention: ``recurrence`` applications of x' = γ·CCA(x) + x.

    Args:
        channels: input and output channels C.
        inner_channels: width C' of queries and keys; defaults to ``channels // 8`` (at least 1).
        recurrence: R, the number of applications, with shared weights (2 in the paper; mmseg's
            ``CCHead(recurrence=2)``).
        zero_init: γ = 0 (paper, mmcv), so a fresh block is the identity; ``False`` sets γ = 1.
        impl: ``"fast"`` (no joint ``(B, *S, ΣS_d)`` tensor) or ``"reference"`` (mmcv's).
        dims: number of dimensions after (B, C): 1, 2 (paper) or 3 (see the module docstring).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Submodules: ``query_conv``, ``key_conv`` (C → C'), ``value_conv`` (C → C), all with bias and
    PyTorch's default init (as mmcv), and ``gamma`` (:class:`Scale`).
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        recurrence: int = 2,
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
            inner_channels = max(channels // 8, 1)
        check_positive_int(name, "inner_channels", inner_channels)
        check_positive_int(name, "recurrence", recurrence)
        check_choice("impl", impl, DISPATCH_IMPLS)
        self.channels = channels
        self.inner_channels = inner_channels
        self.recurrence = recurrence
        self.zero_init = zero_init
        self.impl = impl
        self.dims = dims
        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.query_conv = conv(channels, inner_channels, **kw)
        self.key_conv = conv(channels, inner_channels, **kw)
        self.value_conv = conv(channels, channels, **kw)
        self.gamma = Scale(0.0, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init of the convolutions (as mmcv); γ = 0 with zero_init, else 1."""
        for m in (self.query_conv, self.key_conv, self.value_conv):
            m.reset_parameters()
        with torch.no_grad():
            self.gamma.scale.fill_(0.0 if self.zero_init else 1.0)

    def _check(self, x: Tensor) -> None:
        check_block_input(self, x)

    def attend(self, x: Tensor) -> Tensor:
        """One criss-cross aggregation y = CCA(x), before γ: ``(B, C, *S)``."""
        return criss_cross_aggregate(
            self.query_conv(x), self.key_conv(x), self.value_conv(x), impl=self.impl
        )

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The R steps x ← γ·y(x) + x; returns the output and the sum of the added branches."""
        self._check(x)
        out, branches = x, None
        for _ in range(self.recurrence):
            branch = self.gamma(self.attend(out))
            out = branch + out
            branches = branch if branches is None else branches + branch
        return out, branches

    def residual(self, x: Tensor) -> Tensor:
        """Σ_r γ·y_r, what the R steps add to x (forward(x) = x + residual(x) up to rounding)."""
        return self._run(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        """x after R steps of x ← γ·CCA(x) + x, same shape as ``x``."""
        return self._run(x)[0]

    @torch.no_grad()
    def attention_map(
        self, x: Tensor, queries: Sequence[int] | Tensor | None = None, step: int = 0
    ) -> Tensor:
        """The criss-cross weights of one recurrence step, as rows over all N positions.

        Args:
            x: ``(B, C, *S)`` input of the block.
            queries: query positions in [0, N) (row major); all N when omitted.
            step: which of the R steps (0 = the first, on x; step r reads the output of
                step r − 1).

        Returns:
            ``(B, Nq, N)``: each row has Σ_d S_d − (D − 1) non-zero entries (the query's
            lines, itself once) and sums to 1.

        Raises:
            ValueError: ``step`` outside [0, R), or a query index out of range.
        """
        self._check(x)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.recurrence:
            raise ValueError(
                f"attention_map: step must be an int in [0, {self.recurrence}), got {step!r}"
            )
        size = tuple(x.shape[2:])
        n = math.prod(size)
        idx = query_index(n, queries, x.device)
        h = x
        for _ in range(step):
            h = self.gamma(self.attend(h)) + h
        w = criss_cross_weights(self.query_conv(h), self.key_conv(h))  # (B, *S, ΣS_d)
        w = w.reshape(x.shape[0], n, -1)[:, idx]  # (B, Nq, ΣS_d)
        coords = torch.stack(torch.unravel_index(idx, size), dim=1)  # (Nq, D)
        strides = [math.prod(size[d + 1 :]) for d in range(len(size))]
        flat = (coords * torch.tensor(strides, device=x.device)).sum(1)  # (Nq,): = idx
        keys = []
        for d, s in enumerate(size):
            # the positions of the query's line along d: its coordinate d replaced by 0..S_d-1
            base = flat - coords[:, d] * strides[d]  # (Nq,)
            along = torch.arange(s, device=x.device) * strides[d]  # (S_d,)
            keys.append(base[:, None] + along[None, :])  # (Nq, S_d)
        index = torch.cat(keys, dim=1).expand(x.shape[0], -1, -1)  # (B, Nq, ΣS_d)
        dense = w.new_zeros(x.shape[0], idx.numel(), n)  # (B, Nq, N)
        return dense.scatter_add_(2, index, w)

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """Queries and keys of an input of spatial size ``size``: all positions, row major
        (the rows of :meth:`attention_map` are zero outside each query's lines).

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
            f"{self.channels}, inner_channels={self.inner_channels}, "
            f"recurrence={self.recurrence}, dims={self.dims}, impl={self.impl!r}"
        )
