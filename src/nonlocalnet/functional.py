"""Functional core of the non-local operation: tokens in, aggregated values out.

Every function works on token tensors: queries ``(B, N, C_q)``, keys ``(B, M, C_q)`` and
values ``(B, M, C_v)``, where N is the number of query positions and M the number of key
positions (after any sub-sampling). They compute, for each query i,

    y_i = 1/C(x) · Σ_j f(q_i, k_j) · v_j

for the pairwise functions of Wang et al. (2018):

=====================  ===========================  ==========
pairwise               f(q_i, k_j)                  C(x)
=====================  ===========================  ==========
``gaussian``           exp(s · q_iᵀ k_j)            Σ_j f
``embedded_gaussian``  exp(s · q_iᵀ k_j)            Σ_j f
``dot_product``        q_iᵀ k_j                     M
``concatenation``      ReLU(a_i + b_j)              M
=====================  ===========================  ==========

The two Gaussian forms differ only in what the caller passes as queries and keys (the input
itself, or its θ/φ embeddings); both are softmax attention with scale ``s``. For
``concatenation`` the queries and keys are the scalars ``a_i = w_θᵀ θ(x_i)`` and
``b_j = w_φᵀ φ(x_j)``, given as ``(B, N, 1)`` and ``(B, M, 1)`` tensors.

Two implementations of each:

* ``impl="reference"`` materialises the ``(B, N, M)`` matrix of normalised weights f/C(x) and
  multiplies it with the values: the paper's formula, taken literally. It is the oracle of the
  tests and the path that can return the map.
* ``impl="fast"`` never materialises that matrix:

  - softmax forms: :func:`torch.nn.functional.scaled_dot_product_attention` (fused, O(N) extra
    memory on CPU and CUDA), or exact query-blocked / symmetric-tile kernels where the fused CPU
    kernel would materialise the map; ``kernel=`` (:data:`SOFTMAX_KERNELS`) picks one;
  - dot product: linear attention computed right to left, ``q (kᵀ v) / M``: O((N + M)·C_q·C_v);
  - concatenation: Σ_j ReLU(a_i + b_j) v_j = a_i · Σ_{j∈J_i} v_j + Σ_{j∈J_i} b_j v_j with
    J_i = {j : b_j > −a_i}. Sorting b in decreasing order makes every J_i a prefix of the sorted
    keys, so prefix sums of v and of b·v, indexed by a binary search (:func:`torch.searchsorted`), give every y_i in
    O((N + M)·log M·C_v). Exact, and differentiable by autograd through sort and gather
    (at a_i + b_j = 0 the key is left out, matching ReLU'(0) = 0). ONNX has no binary search:
    while :func:`torch.onnx.export` traces, the counts |J_i| come from one sort of the queries
    merged with the keys instead (:func:`merged_counts`), which exports and gives the same
    integers.

Precision: half and bfloat16 inputs (autocast included) are accumulated in float32 wherever a
sum could leave their range: the logits and softmax of the reference path and of
:func:`pairwise_weights`, the kᵀv product of the dot product, the prefix sums of the
concatenation and the blocked softmax kernels. Every aggregate returns the values' dtype.

This module depends on torch alone.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocalnet._checks import check_choice, check_tokens

__all__ = [
    "IMPLS",
    "PAIRWISE",
    "SOFTMAX_KERNELS",
    "aggregate",
    "chunked_softmax_aggregate",
    "concatenation_aggregate",
    "default_scale",
    "dot_product_aggregate",
    "merged_counts",
    "pairwise_weights",
    "softmax_aggregate",
    "symmetric_softmax_aggregate",
]

PAIRWISE = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
IMPLS = ("fast", "reference")
SOFTMAX_PAIRWISE = ("gaussian", "embedded_gaussian")
#: Kernels of the fast softmax path (see :func:`softmax_aggregate`).
SOFTMAX_KERNELS = ("auto", "sdpa", "blocked")


def default_scale(pairwise: str, dim: int, use_scale: bool | None) -> float:
    """Scale applied to the logits q_iᵀk_j of the softmax forms.

    Args:
        pairwise: the pairwise function.
        dim: length of the vectors dotted (C' for embedded_gaussian, C for gaussian).
        use_scale: ``None`` for the default (dim^-1/2 for embedded_gaussian as in the official
            code, 1 for gaussian as in the paper), True/False to force it.

    Returns:
        The scale; 1.0 for the forms without a softmax.

    Raises:
        ValueError: ``use_scale=True`` for a pairwise function without a softmax.
    """
    check_choice("pairwise", pairwise, PAIRWISE)
    if pairwise not in SOFTMAX_PAIRWISE:
        if use_scale:
            raise ValueError(
                f"use_scale applies to the softmax forms (gaussian, embedded_gaussian), "
                f"got use_scale=True with pairwise={pairwise!r}"
            )
        return 1.0
    if use_scale is None:
        use_scale = pairwise == "embedded_gaussian"
    return dim**-0.5 if use_scale else 1.0


def _check_qkv(query: Tensor, key: Tensor, value: Tensor, same_dim: bool) -> None:
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
    if same_dim and query.shape[2] != key.shape[2]:
        raise ValueError(
            f"query and key must have the same channel count, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled, on devices that have autocast (not on ``meta``)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half and bfloat16 inputs, float32/float64 otherwise (the widest given)."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _weights(pairwise: str, query: Tensor, key: Tensor, scale: float) -> Tensor:
    """f(q_i, k_j) / C(x) as ``(B, N, M)``, computed and returned in (at least) float32."""
    acc = _accumulation_dtype(query, key)
    m = key.shape[1]
    with _autocast_off(query.device.type):
        q, k = query.to(acc), key.to(acc)
        if pairwise in SOFTMAX_PAIRWISE:
            logits = torch.bmm(q, k.transpose(1, 2)) * scale  # (B, N, M)
            return torch.softmax(logits, dim=-1)
        if pairwise == "dot_product":
            return torch.bmm(q, k.transpose(1, 2)) / m  # (B, N, M)
        # concatenation: f = ReLU(a_i + b_j), a: (B, N, 1), b: (B, M, 1)
        return F.relu(q + k.transpose(1, 2)) / m  # (B, N, M)


def _weighted_sum(weights: Tensor, value: Tensor) -> Tensor:
    """``weights @ value`` in the weights' (accumulation) dtype, returned in the values' dtype."""
    acc = torch.promote_types(weights.dtype, value.dtype)
    with _autocast_off(value.device.type):
        out = torch.bmm(weights.to(acc), value.to(acc))  # (B, N, C_v)
    return out.to(value.dtype)


def pairwise_weights(
    pairwise: str,
    query: Tensor,
    key: Tensor,
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The normalised pairwise weights f(q_i, k_j) / C(x), materialised.

    The logits, the softmax and the products are computed in (at least) float32, also for
    half and bfloat16 inputs and under autocast, so that large logits neither overflow to inf
    (float16 tops out at 65504) nor turn the softmax into NaN.

    Args:
        pairwise: one of :data:`PAIRWISE`.
        query: ``(B, N, C_q)`` (``(B, N, 1)`` holding a_i for concatenation).
        key: ``(B, M, C_q)`` (``(B, M, 1)`` holding b_j for concatenation).
        scale: logit scale of the softmax forms.
        dtype: dtype of the result; by default that of the inputs. The blocks' ``attention_map``
            asks for at least float32.

    Returns:
        ``(B, N, M)`` weights; rows sum to 1 for the softmax forms.
    """
    check_choice("pairwise", pairwise, PAIRWISE)
    out_dtype = dtype if dtype is not None else torch.promote_types(query.dtype, key.dtype)
    return _weights(pairwise, query, key, scale).to(out_dtype)


def _check_kernel(kernel: str, impl: str) -> None:
    """Reject an unknown softmax kernel, or one named for the reference path.

    Args:
        kernel: one of :data:`SOFTMAX_KERNELS`.
        impl: ``"fast"`` or ``"reference"``.

    Raises:
        ValueError: unknown ``kernel``, or a kernel other than ``"auto"`` with
            ``impl="reference"`` (which always materialises the map).
    """
    check_choice("kernel", kernel, SOFTMAX_KERNELS)
    if kernel != "auto" and impl == "reference":
        raise ValueError(
            f"kernel picks a fast softmax kernel; impl='reference' takes kernel='auto', "
            f"got kernel={kernel!r}"
        )


def softmax_aggregate(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    impl: str = "fast",
    kernel: str = "auto",
) -> Tensor:
    """Σ_j softmax_j(s · q_iᵀ k_j) v_j.

    Kernels of the fast path (``kernel``):

    * ``"auto"``: on the CPU, :func:`symmetric_softmax_aggregate` when ``key is query`` (the
      logits are symmetric), :func:`chunked_softmax_aggregate` when the value width differs
      from the query width (the fused CPU kernel would fall back to the materialising math
      kernel), the fused kernel otherwise; on other devices the fused kernel, the narrower side
      zero-padded (exact) when the widths differ.
    * ``"sdpa"``: the fused kernel on every device, the narrower side zero-padded.
    * ``"blocked"``: :func:`chunked_softmax_aggregate` on every device (one BLAS product per
      block of queries). Single-threaded on the CPU the fused kernel was ~10% faster; with 2
      threads on a loaded machine it lost 2-3× to the blocked one (spinning threads).

    Args:
        query: ``(B, N, C_q)``.
        key: ``(B, M, C_q)``.
        value: ``(B, M, C_v)``.
        scale: logit scale s (pass 1.0 for unscaled).
        impl: ``"fast"`` (no materialised map) or ``"reference"`` (materialised map).
        kernel: one of :data:`SOFTMAX_KERNELS`, for ``impl="fast"``; ``"auto"`` for the reference.

    Returns:
        ``(B, N, C_v)``.

    Raises:
        ValueError: unknown ``impl``/``kernel``, or a kernel other than ``"auto"`` with the
            reference.
    """
    check_choice("impl", impl, IMPLS)
    _check_kernel(kernel, impl)
    if impl == "reference":
        return _weighted_sum(_weights("gaussian", query, key, scale), value)
    if kernel == "blocked":
        return chunked_softmax_aggregate(query, key, value, scale=scale)
    c_q, c_v = query.shape[-1], value.shape[-1]
    on_cpu = query.device.type == "cpu" and kernel == "auto"
    if on_cpu and key is query:
        # Self-attention on one tensor (gaussian without sub-sampling): the logits are symmetric,
        # so each tile of them serves two tiles of the map.
        return symmetric_softmax_aggregate(query, value, scale=scale)
    if c_v != c_q and on_cpu:
        # The fused CPU kernel needs equal head dims for q/k and v; otherwise it silently falls
        # back to the materialising math kernel. Zero-padding would be exact but wastes up to
        # half its products (gaussian: C-wide logits, C/2-wide values); blocks of queries cost
        # only what the formula needs.
        return chunked_softmax_aggregate(query, key, value, scale=scale)
    if c_v != c_q:
        # Zero-pad the narrower side (exact) for the fused kernels.
        if c_v < c_q:
            out = _sdpa(query, key, F.pad(value, (0, c_q - c_v)), scale)
            return out[..., :c_v]
        pad = c_v - c_q
        return _sdpa(F.pad(query, (0, pad)), F.pad(key, (0, pad)), value, scale)
    return _sdpa(query, key, value, scale)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    # Non-contiguous inputs (e.g. a transposed (B, C, N) view) also make the CPU kernel fall back
    # to the materialising math path, so lay them out densely first: O(N·C) copies.
    q = query.contiguous()
    k = q if key is query else key.contiguous()  # self-attention on the input: one copy
    out = F.scaled_dot_product_attention(
        q.unsqueeze(1), k.unsqueeze(1), value.contiguous().unsqueeze(1), scale=scale
    )  # (B, 1, N, C_v): one head
    return out.squeeze(1)  # (B, N, C_v)


#: Logits (queries × keys) per block of :func:`chunked_softmax_aggregate`: 16 MiB in float32.
ATTENTION_CHUNK_ELEMENTS = 1 << 22


def chunked_softmax_aggregate(
    query: Tensor, key: Tensor, value: Tensor, *, scale: float, chunk: int | None = None
) -> Tensor:
    """Σ_j softmax_j(s · q_iᵀ k_j) v_j, exact, one block of queries at a time.

    Each block holds ``chunk × M`` logits (by default :data:`ATTENTION_CHUNK_ELEMENTS` in all),
    never the whole N×M map; the backward pass recomputes each block from the saved
    log-sum-exp, as fused attention does. Unlike the fused CPU kernel it takes values of any
    width, so the products cost what the formula needs: 2·N·M·(C_q + C_v) forward,
    2·N·M·(2·C_q + C_v) + 2·N·M·(C_q + C_v) backward. Half-precision inputs are accumulated in
    float32.

    Args:
        query: ``(B, N, C_q)``.
        key: ``(B, M, C_q)``.
        value: ``(B, M, C_v)``.
        scale: logit scale s.
        chunk: queries per block; by default as many as fit in
            :data:`ATTENTION_CHUNK_ELEMENTS` logits.

    Returns:
        ``(B, N, C_v)``.
    """
    if chunk is None:
        chunk = max(1, ATTENTION_CHUNK_ELEMENTS // key.shape[1])
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedSoftmaxAttention.apply(query, key, value, float(scale), int(chunk))


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """softmax(s·q kᵀ) v by blocks of queries; backward recomputes the blocks."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, scale: float, chunk: int):
        out_dtype = value.dtype
        acc = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            q = query.to(acc).contiguous()
            k = q if key is query else key.to(acc).contiguous()
            v = value.to(acc).contiguous()
            kt = k.transpose(1, 2)  # (B, C_q, M)
            outs, lses = [], []
            for q_c in q.split(chunk, dim=1):
                s = torch.bmm(q_c, kt).mul_(scale)  # (B, n_c, M): one block of logits
                m = s.amax(dim=-1, keepdim=True)  # (B, n_c, 1)
                p = s.sub_(m).exp_()  # (B, n_c, M), unnormalised, in place
                l = p.sum(dim=-1, keepdim=True)  # (B, n_c, 1)
                outs.append(torch.bmm(p, v) / l)  # (B, n_c, C_v)
                lses.append(m + torch.log(l))  # (B, n_c, 1)
            out = torch.cat(outs, dim=1)  # (B, N, C_v)
            lse = torch.cat(lses, dim=1)  # (B, N, 1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.chunk, ctx.shared = scale, chunk, key is query
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        with torch.autocast(q.device.type, enabled=False):
            do = grad_out.to(q.dtype).contiguous()  # (B, N, C_v)
            delta = (do * out).sum(dim=-1, keepdim=True)  # (B, N, 1): rowsum(dO ∘ O)
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, C_q, M), (B, C_v, M)
            dk = torch.zeros_like(k)
            dv = torch.zeros_like(v)
            dqs = []
            for q_c, do_c, lse_c, delta_c in zip(
                q.split(chunk, dim=1),
                do.split(chunk, dim=1),
                lse.split(chunk, dim=1),
                delta.split(chunk, dim=1),
                strict=True,
            ):
                # Two (B, n_c, M) buffers at a time, updated in place.
                p = torch.bmm(q_c, kt).mul_(scale).sub_(lse_c).exp_()  # normalised weights
                dv.baddbmm_(p.transpose(1, 2), do_c)  # (B, M, C_v) += pᵀ dO
                ds = torch.bmm(do_c, vt).sub_(delta_c).mul_(p).mul_(scale)  # dL/d(q·k)
                del p
                dqs.append(torch.bmm(ds, k))  # (B, n_c, C_q)
                dk.baddbmm_(ds.transpose(1, 2), q_c)  # (B, M, C_q) += dSᵀ q
            dq = torch.cat(dqs, dim=1)  # (B, N, C_q)
        dq_t, dk_t, dv_t = ctx.dtypes
        if ctx.shared:  # key is query: its gradient is the sum, returned once
            return (dq + dk).to(dq_t), None, dv.to(dv_t), None, None
        return dq.to(dq_t), dk.to(dk_t), dv.to(dv_t), None, None


#: Side of the square logit tiles of :func:`symmetric_softmax_aggregate` (4 MiB in float32).
SYMMETRIC_TILE = 1024


def symmetric_softmax_aggregate(
    x: Tensor, value: Tensor, *, scale: float, tile: int | None = None
) -> Tensor:
    """Σ_j softmax_j(s · x_iᵀ x_j) v_j when the keys are the queries, exact, by tiles.

    The logits S = s·X Xᵀ are symmetric, so one ``tile × tile`` block S_IJ (I ≤ J) gives both
    the (I, J) and the (J, I) blocks of the map. An online softmax (running max and sum per
    row, as in flash attention) accumulates the output without the N×N map; the backward pass
    recomputes each S_IJ once and sends the gradient of both blocks through it,
    dX_I += s·G X_J and dX_J += s·Gᵀ X_I with G = dS_IJ + dS_JIᵀ. Products: 2·N²·(2·C + 3·C_v)
    in all against 2·N²·(3·C + 3·C_v) for the materialised map (gaussian: C = 512, C_v = 256).

    Args:
        x: ``(B, N, C)`` queries, which are also the keys.
        value: ``(B, N, C_v)``.
        scale: logit scale s.
        tile: side of the logit tiles; :data:`SYMMETRIC_TILE` by default.

    Returns:
        ``(B, N, C_v)``.
    """
    tile = SYMMETRIC_TILE if tile is None else tile
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if value.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"value must have the positions of x, got x {tuple(x.shape)} and value "
            f"{tuple(value.shape)}"
        )
    return _SymmetricSoftmaxAttention.apply(x, value, float(scale), int(tile))


def _online_update(state: list[Tensor], s: Tensor, v: Tensor) -> None:
    """Fold one block of logits ``s`` (B, n_i, n_j) and values ``v`` (B, n_j, C_v) into rows i."""
    m, l, o = state
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B, n_i, 1)
    alpha = torch.exp(m - m_new)  # (B, n_i, 1): rescales what was accumulated
    p = torch.exp(s - m_new)  # (B, n_i, n_j)
    state[0] = m_new
    state[1] = l * alpha + p.sum(dim=-1, keepdim=True)
    state[2] = torch.baddbmm(o * alpha, p, v)  # (B, n_i, C_v)


class _SymmetricSoftmaxAttention(torch.autograd.Function):
    """softmax(s·x xᵀ) v over tiles I ≤ J of the symmetric logits; backward recomputes them."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, scale: float, tile: int):
        out_dtype = value.dtype
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xa = x.to(acc).contiguous()
            va = value.to(acc).contiguous()
            xs, vs = xa.split(tile, dim=1), va.split(tile, dim=1)
            states = [
                [
                    torch.full((*xi.shape[:2], 1), -math.inf, dtype=acc, device=x.device),
                    xi.new_zeros((*xi.shape[:2], 1)),
                    xi.new_zeros((*xi.shape[:2], va.shape[-1])),
                ]
                for xi in xs
            ]
            for i, xi in enumerate(xs):
                for j in range(i, len(xs)):
                    s = torch.bmm(xi, xs[j].transpose(1, 2)).mul_(scale)  # (B, n_i, n_j)
                    _online_update(states[i], s, vs[j])
                    if j != i:
                        _online_update(states[j], s.transpose(1, 2), vs[i])  # S_JI = S_IJᵀ
            out = torch.cat([o / l for _, l, o in states], dim=1)  # (B, N, C_v)
            lse = torch.cat([m + torch.log(l) for m, l, _ in states], dim=1)  # (B, N, 1)
        ctx.save_for_backward(xa, va, out, lse)
        ctx.scale, ctx.tile, ctx.dtypes = scale, tile, (x.dtype, value.dtype)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xa, va, out, lse = ctx.saved_tensors
        scale, tile = ctx.scale, ctx.tile
        with torch.autocast(xa.device.type, enabled=False):
            do = grad_out.to(xa.dtype).contiguous()  # (B, N, C_v)
            delta = (do * out).sum(dim=-1, keepdim=True)  # (B, N, 1): rowsum(dO ∘ O)
            dx, dv = torch.zeros_like(xa), torch.zeros_like(va)
            xs, vs, dos = xa.split(tile, 1), va.split(tile, 1), do.split(tile, 1)
            lses, deltas = lse.split(tile, 1), delta.split(tile, 1)
            dxs, dvs = dx.split(tile, 1), dv.split(tile, 1)  # views: updated in place

            def block_grad(s: Tensor, i: int, j: int) -> Tensor:
                # rows i, keys j: dV_j += Pᵀ dO_i; returns dS = P ∘ (dO_i V_jᵀ - δ_i)
                p = (s - lses[i]).exp_()  # (B, n_i, n_j): normalised weights
                dvs[j].baddbmm_(p.transpose(1, 2), dos[i])
                return torch.bmm(dos[i], vs[j].transpose(1, 2)).sub_(deltas[i]).mul_(p)

            for i, xi in enumerate(xs):
                for j in range(i, len(xs)):
                    s = torch.bmm(xi, xs[j].transpose(1, 2)).mul_(scale)  # (B, n_i, n_j)
                    g = block_grad(s, i, j)  # dS_IJ
                    if j != i:
                        g += block_grad(s.transpose(1, 2), j, i).transpose(1, 2)  # + dS_JIᵀ
                        dxs[j].baddbmm_(g.transpose(1, 2), xi, alpha=scale)
                    else:
                        g = g + g.transpose(1, 2)  # both places of each diagonal-tile logit
                    dxs[i].baddbmm_(g, xs[j], alpha=scale)
        x_t, v_t = ctx.dtypes
        return dx.to(x_t), dv.to(v_t), None, None


def dot_product_aggregate(
    query: Tensor, key: Tensor, value: Tensor, *, impl: str = "fast"
) -> Tensor:
    """Σ_j (q_iᵀ k_j) v_j / M.

    Args:
        query: ``(B, N, C_q)``.
        key: ``(B, M, C_q)``.
        value: ``(B, M, C_v)``.
        impl: ``"fast"`` (right-to-left product, q (kᵀv) / M) or ``"reference"``.

    Returns:
        ``(B, N, C_v)``.
    """
    check_choice("impl", impl, IMPLS)
    if impl == "reference":
        return _weighted_sum(_weights("dot_product", query, key, 1.0), value)
    # kᵀv sums over all M keys: accumulate half and bfloat16 in float32, where it cannot
    # overflow (float16 tops out at 65504).
    acc = _accumulation_dtype(query, key, value)
    with _autocast_off(query.device.type):
        q, k, v = query.to(acc), key.to(acc), value.to(acc)
        kv = torch.bmm(k.transpose(1, 2), v)  # (B, C_q, C_v)
        out = torch.bmm(q, kv) / key.shape[1]  # (B, N, C_v)
    return out.to(value.dtype)


def merged_counts(thresholds: Tensor, query: Tensor) -> Tensor:
    """#{j : t_j < q_i} for every query, by one sort of queries and thresholds together.

    What ``torch.searchsorted(thresholds, query)`` gives for sorted thresholds, from operations
    that ONNX has (sort, cumsum, gather, scatter): in the merged ascending order, the count of
    a query is the number of thresholds in the groups of equal values before its own, so ties
    (t_j = q_i, not counted) come out exact whatever order the sort leaves equal values in.
    O((N + M)·log(N + M)).

    Args:
        thresholds: ``(B, M)`` thresholds t_j (in any order).
        query: ``(B, N)`` values q_i.

    Returns:
        ``(B, N)`` long counts.
    """
    n = query.shape[1]
    merged = torch.cat([query, thresholds.to(query.dtype)], dim=1)  # (B, N + M)
    is_key = torch.cat(
        [torch.zeros_like(query, dtype=torch.long), torch.ones_like(thresholds, dtype=torch.long)],
        dim=1,
    )  # (B, N + M): 1 for a threshold
    values, order = torch.sort(merged, dim=1)  # (B, N + M)
    key_sorted = torch.gather(is_key, 1, order)  # (B, N + M)
    new_group = torch.cat(
        [
            torch.ones_like(values[:, :1], dtype=torch.long),
            (values[:, 1:] != values[:, :-1]).long(),
        ],
        dim=1,
    )  # (B, N + M): 1 where a run of equal values starts
    group = torch.cumsum(new_group, dim=1) - 1  # (B, N + M): run index in [0, N + M)
    per_group = torch.zeros_like(key_sorted).scatter_add(1, group, key_sorted)  # (B, N + M)
    before = torch.cumsum(per_group, dim=1) - per_group  # thresholds in earlier runs
    counts = torch.gather(before, 1, group)  # (B, N + M), in sorted order
    counts = torch.zeros_like(counts).scatter(1, order, counts)  # (B, N + M), merged order
    return counts[:, :n]  # (B, N)


def concatenation_aggregate(a: Tensor, b: Tensor, value: Tensor, *, impl: str = "fast") -> Tensor:
    """Σ_j ReLU(a_i + b_j) v_j / M.

    Args:
        a: ``(B, N, 1)`` query terms w_θᵀθ(x_i).
        b: ``(B, M, 1)`` key terms w_φᵀφ(x_j).
        value: ``(B, M, C_v)``.
        impl: ``"fast"`` (sort + prefix sums + binary search) or ``"reference"``.

    Returns:
        ``(B, N, C_v)``.
    """
    check_choice("impl", impl, IMPLS)
    if a.shape[-1] != 1 or b.shape[-1] != 1:
        raise ValueError(
            f"concatenation takes scalar query/key terms of shape (B, N, 1) and (B, M, 1), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if impl == "reference":
        return _weighted_sum(_weights("concatenation", a, b, 1.0), value)
    m = b.shape[1]
    out_dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), value.dtype)
    # The prefix sums below add large partial sums (a_i Σ v + Σ b v): accumulate half and
    # bfloat16 inputs in float32, as fused attention kernels do.
    acc = torch.promote_types(out_dtype, torch.float32)
    a, b, value = a.to(acc), b.to(acc), value.to(acc)
    # Keys sorted by decreasing b: every J_i = {j : b_j > -a_i} is a prefix of that order, so
    # prefix sums (along the last, contiguous dim of a (B, C_v, M) layout: several times faster
    # than along M in (B, M, C_v)) indexed by |J_i| give Σ_{J_i} v_j and Σ_{J_i} b_j v_j.
    b_sorted, order = torch.sort(b.squeeze(-1), dim=1, descending=True)  # (B, M)
    v_t = value.transpose(1, 2)  # (B, C_v, M)
    v_sorted = torch.gather(v_t, 2, order.unsqueeze(1).expand_as(v_t))  # (B, C_v, M)
    bv_sorted = v_sorted * b_sorted.unsqueeze(1)  # (B, C_v, M)
    # A leading zero column: prefix[..., k] = Σ of the first k sorted keys, k = 0..M.
    prefix_v = torch.cumsum(F.pad(v_sorted, (1, 0)), dim=-1)  # (B, C_v, M + 1)
    prefix_bv = torch.cumsum(F.pad(bv_sorted, (1, 0)), dim=-1)  # (B, C_v, M + 1)
    # |J_i| = #{j : -b_j < a_i}; -b_sorted is ascending. Keys with b_j == -a_i are left out
    # (they contribute ReLU(0) = 0, and ReLU'(0) = 0).
    thresholds, queries = (-b_sorted).contiguous(), a.squeeze(-1).contiguous()  # (B, M), (B, N)
    if torch.onnx.is_in_onnx_export():  # ONNX has no searchsorted
        count = merged_counts(thresholds, queries)  # (B, N)
    else:
        count = torch.searchsorted(thresholds, queries)  # (B, N)
    index = count.unsqueeze(1).expand(-1, v_t.shape[1], -1)  # (B, C_v, N)
    sum_v = torch.gather(prefix_v, 2, index).transpose(1, 2)  # (B, N, C_v)
    sum_bv = torch.gather(prefix_bv, 2, index).transpose(1, 2)  # (B, N, C_v)
    return ((a * sum_v + sum_bv) / m).to(out_dtype)  # (B, N, C_v)


def aggregate(
    pairwise: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float = 1.0,
    impl: str = "fast",
    kernel: str = "auto",
) -> Tensor:
    """y_i = 1/C(x) Σ_j f(q_i, k_j) v_j for any pairwise function of the NL paper.

    Args:
        pairwise: one of :data:`PAIRWISE`.
        query: ``(B, N, C_q)``; for concatenation ``(B, N, 1)`` holding a_i.
        key: ``(B, M, C_q)``; for concatenation ``(B, M, 1)`` holding b_j.
        value: ``(B, M, C_v)``.
        scale: logit scale of the softmax forms (see :func:`default_scale`).
        impl: ``"fast"`` or ``"reference"``.
        kernel: fast softmax kernel (see :func:`softmax_aggregate`); the forms without a
            softmax and the reference path take ``"auto"``.

    Returns:
        ``(B, N, C_v)``.

    Raises:
        ValueError: unknown ``pairwise``/``impl``/``kernel``, a kernel other than ``"auto"``
            for a form without a softmax or for the reference, mismatched shapes, empty
            dimensions.
        TypeError: non-tensor or non-floating inputs.
    """
    check_choice("pairwise", pairwise, PAIRWISE)
    check_choice("impl", impl, IMPLS)
    _check_kernel(kernel, impl)
    if kernel != "auto" and pairwise not in SOFTMAX_PAIRWISE:
        raise ValueError(
            f"kernel applies to the softmax forms (gaussian, embedded_gaussian), "
            f"got kernel={kernel!r} with pairwise={pairwise!r}"
        )
    _check_qkv(query, key, value, same_dim=True)
    # (skipped while torch.compile traces: Dynamo may see scale as a symbolic float)
    if not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if pairwise in SOFTMAX_PAIRWISE:
        return softmax_aggregate(query, key, value, scale=scale, impl=impl, kernel=kernel)
    if pairwise == "dot_product":
        return dot_product_aggregate(query, key, value, impl=impl)
    return concatenation_aggregate(query, key, value, impl=impl)
