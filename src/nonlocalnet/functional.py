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

Implementations (``impl=``)
---------------------------

* ``"reference"`` materialises the ``(B, N, M)`` matrix of normalised weights f/C(x) and
  multiplies it with the values: the paper's formula, taken literally. It is the oracle of the
  tests and the path that can return the map.
* a kernel, by name (:data:`KERNELS`):

  - ``"direct"`` (every form): the map as one batched product, normalised in place, times the
    values; what the peers compute, without their copies. The fastest form while the map is
    small, and it keeps the map for the backward pass instead of recomputing it;
  - ``"sdpa"`` (softmax forms): :func:`torch.nn.functional.scaled_dot_product_attention`, fused,
    O(N) extra memory (the narrower of the query/value widths zero-padded, exact, where the
    fused kernel needs equal widths);
  - ``"blocked"`` (softmax forms): :func:`chunked_softmax_aggregate`, one block of queries at a
    time, any widths;
  - ``"symmetric"`` (softmax forms, keys that are the queries: gaussian without sub-sampling):
    :func:`symmetric_softmax_aggregate`, each tile of the symmetric logits computed once for
    two tiles of the map;
  - ``"linear"`` (dot product): linear attention computed right to left, ``q (kᵀ v) / M``:
    O((N + M)·C_q·C_v);
  - ``"sorted"`` (concatenation): Σ_j ReLU(a_i + b_j) v_j = a_i · Σ_{j∈J_i} v_j +
    Σ_{j∈J_i} b_j v_j with J_i = {j : b_j > −a_i}. Sorting b in decreasing order makes every
    J_i a prefix of the sorted keys, so prefix sums of v and of b·v, indexed by a binary search
    (:func:`torch.searchsorted`), give every y_i in O((N + M)·log M·C_v). Exact, and
    differentiable by autograd through sort and gather (at a_i + b_j = 0 the key is left out,
    matching ReLU'(0) = 0). ONNX has no binary search: while :func:`torch.onnx.export` traces,
    the counts |J_i| come from one sort of the queries merged with the keys instead
    (:func:`merged_counts`), which exports and gives the same integers.

* ``"fast"``: the dispatcher's choice among the kernels that never form the N×M map
  (:data:`LINEAR_MEMORY_KERNELS`), for any size;
* ``"auto"`` (default): the dispatcher's choice among all kernels: ``"direct"`` where the map is
  small, the ``"fast"`` choice otherwise.

The dispatch (:func:`choose_kernel`; :func:`select_kernel` reads it off tensors) depends on the
shapes, the device and whether the keys are the queries, never on a global setting:

* ``"direct"`` (``impl="auto"`` only) while the map is small (:func:`small_map`). Softmax
  forms on the CPU: while a backward pass follows and one sample's map has at most
  :data:`DIRECT_MAX_ELEMENTS` elements (16 MiB in float32; half that when the keys are the
  queries) and at most :data:`DIRECT_MAX_TOKEN_RATIO` times the elements of its query, key and
  value tokens (about the block's own activations), so memory stays O(N) for large maps and
  narrow widths; without a backward pass the fused float32 kernels are faster at every size
  measured (under a bfloat16 autocast the direct kernel, whose products then run in bfloat16,
  stays the faster one up to the same caps).
  Concatenation: while the map has no more elements than the a, b and value tokens. Dot
  product: while the map costs fewer products than the linear form,
  N·M·(C_q + C_v) < (N + M)·C_q·C_v. On a CUDA device the softmax forms take the fused kernel
  at every size;
* otherwise, on the CPU: ``"symmetric"`` when the keys are the queries, ``"blocked"`` when the
  widths differ (the fused CPU kernel would fall back to the materialising math kernel),
  ``"sdpa"`` when they are equal; on other devices ``"sdpa"`` (widths padded to a common
  multiple of 8, as FlashAttention and the memory-efficient kernel need); ``"linear"`` and
  ``"sorted"`` for the forms without a softmax.

The chosen kernel is logged at DEBUG level on the ``nonlocalnet.kernels`` logger.

Precision: half and bfloat16 inputs are accumulated in float32 wherever a sum could leave
their range: the logits and softmax of the reference and direct paths and of
:func:`pairwise_weights`, the kᵀv product of the dot product, the prefix sums of the
concatenation and the blocked softmax kernels. Under a bfloat16 autocast the direct, blocked
and symmetric kernels run their matrix products in bfloat16, as autocast runs the peers'
(accumulated in float32 inside the matrix kernel, results rounded to bfloat16: bfloat16 has
float32's range, so only precision is at stake), while softmax statistics, row sums and
accumulated outputs and gradients stay in float32; float16 keeps float32 logits. The reference
keeps float32 throughout. Every aggregate returns the values' dtype.

This module depends on torch alone.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocalnet._checks import check_choice, check_tokens

__all__ = [
    "DIRECT_MAX_ELEMENTS",
    "DIRECT_MAX_TOKEN_RATIO",
    "DIRECT_SHARED_MAX_ELEMENTS",
    "DISPATCH_IMPLS",
    "IMPLS",
    "KERNELS",
    "LINEAR_MEMORY_KERNELS",
    "PAIRWISE",
    "SOFTMAX_KERNELS",
    "aggregate",
    "check_impl",
    "choose_kernel",
    "chunked_softmax_aggregate",
    "concatenation_aggregate",
    "default_scale",
    "dot_product_aggregate",
    "impl_choices",
    "merged_counts",
    "pairwise_weights",
    "select_kernel",
    "small_map",
    "softmax_aggregate",
    "symmetric_softmax_aggregate",
]

_log = logging.getLogger("nonlocalnet.kernels")

PAIRWISE = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
#: the two implementations every block has: the fast path (never the N×M map) and the reference.
IMPLS = ("fast", "reference")
#: what ``impl=`` takes besides a kernel name: the dispatcher over every kernel (default), over
#: the kernels that never form the map, or the reference.
DISPATCH_IMPLS = ("auto", "fast", "reference")
SOFTMAX_PAIRWISE = ("gaussian", "embedded_gaussian")
#: kernels of the softmax forms.
SOFTMAX_KERNELS = ("direct", "symmetric", "sdpa", "blocked")
#: kernels by pairwise function.
KERNELS = {
    "gaussian": SOFTMAX_KERNELS,
    "embedded_gaussian": SOFTMAX_KERNELS,
    "dot_product": ("direct", "linear"),
    "concatenation": ("direct", "sorted"),
}
#: kernels that never form the N×M map: O(N) extra memory (what ``impl="fast"`` picks from).
LINEAR_MEMORY_KERNELS = ("symmetric", "sdpa", "blocked", "linear", "sorted")


def impl_choices(pairwise: str) -> tuple[str, ...]:
    """What ``impl=`` accepts for ``pairwise``: :data:`DISPATCH_IMPLS`, then its kernels."""
    check_choice("pairwise", pairwise, PAIRWISE)
    return (*DISPATCH_IMPLS, *KERNELS[pairwise])


def check_impl(impl: object, pairwise: str | None = None, *, owner: str | None = None) -> None:
    """Raise ``ValueError`` unless ``impl`` is a dispatch choice or a kernel of ``pairwise``.

    Args:
        impl: the value given.
        pairwise: the pairwise function whose kernels are accepted; ``None`` accepts any kernel.
        owner: the module or function reporting the error (prefixes the message).
    """
    if pairwise is None:
        kernels = tuple(dict.fromkeys(k for ks in KERNELS.values() for k in ks))
        choices = (*DISPATCH_IMPLS, *kernels)
    else:
        choices = impl_choices(pairwise)
    check_choice("impl", impl, choices, owner=owner)


#: Largest map (elements per sample, N·M) the direct kernel takes for a softmax form while
#: gradients are needed: 16 MiB in float32. Above it, the fused kernel's recomputation costs
#: less than the map's memory traffic (measured: direct 6-12% faster than the fused CPU
#: kernel for N = M up to 1568 at C' = 256, even at N = M = 2048, 0.4% slower at 2560).
DIRECT_MAX_ELEMENTS = 1 << 22
#: The same when the keys are the queries, where the symmetric kernel saves a third of the
#: logit products (measured: direct 14% faster at N = 784, even at 1568, 17% slower at 3136).
DIRECT_SHARED_MAX_ELEMENTS = 1 << 21
#: The direct kernel's map is also kept at most this many times the q, k, v tokens (the block's
#: own activations are about as large), so that memory stays O(N) for narrow widths.
DIRECT_MAX_TOKEN_RATIO = 3


def small_map(
    pairwise: str,
    n: int,
    m: int,
    c_q: int,
    c_v: int,
    *,
    shared: bool = False,
    grad: bool = True,
    autocast_bf16: bool = False,
) -> bool:
    """Whether the direct kernel is the better choice (see the module docstring).

    Args:
        pairwise: the pairwise function.
        n: queries N.
        m: keys M.
        c_q: query/key width (1 for concatenation).
        c_v: value width.
        shared: the keys are the queries.
        grad: a backward pass will follow (the direct kernel keeps its map for it, where the
            fused kernels recompute theirs; without one, the fused float32 kernels are faster).
        autocast_bf16: a bfloat16 autocast is on: the direct kernel runs its products in
            bfloat16 as autocast does, faster than the fused CPU kernel with or without a
            backward pass.
    """
    if pairwise == "dot_product":
        return n * m * (c_q + c_v) < (n + m) * c_q * c_v
    tokens = n * c_q + m * (c_q + c_v)
    if pairwise == "concatenation":
        return n * m <= tokens
    if not (grad or autocast_bf16):
        return False
    cap = DIRECT_SHARED_MAX_ELEMENTS if shared else DIRECT_MAX_ELEMENTS
    return n * m <= min(cap, DIRECT_MAX_TOKEN_RATIO * tokens)


def choose_kernel(
    pairwise: str,
    *,
    n: int,
    m: int,
    c_q: int,
    c_v: int,
    shared: bool = False,
    device_type: str = "cpu",
    grad: bool = True,
    autocast_bf16: bool = False,
    impl: str = "auto",
) -> str:
    """The kernel :func:`aggregate` runs for these shapes (see the module docstring).

    Args:
        pairwise: one of :data:`PAIRWISE`.
        n: queries N.
        m: keys M.
        c_q: query/key width (1 for concatenation).
        c_v: value width.
        shared: the keys are the queries (one tensor).
        device_type: ``"cpu"``, ``"cuda"``, ...
        grad: a backward pass will follow.
        autocast_bf16: a bfloat16 autocast is on for the device.
        impl: ``"auto"``, ``"fast"``, ``"reference"`` or a kernel of ``pairwise``.

    Returns:
        A kernel of :data:`KERNELS`, or ``"reference"``.

    Raises:
        ValueError: unknown ``impl``, or ``"symmetric"`` for keys that are not the queries.
    """
    check_impl(impl, pairwise)
    if impl == "reference":
        return "reference"
    if impl not in DISPATCH_IMPLS:
        if impl == "symmetric" and not shared:
            raise ValueError(
                "impl='symmetric' needs keys that are the queries (one tensor: gaussian "
                "without sub-sampling)"
            )
        return impl
    softmax = pairwise in SOFTMAX_PAIRWISE
    on_cpu = device_type == "cpu"
    small = small_map(
        pairwise, n, m, c_q, c_v, shared=shared, grad=grad, autocast_bf16=autocast_bf16
    )
    if impl == "auto" and (on_cpu or not softmax) and small:
        return "direct"
    if pairwise == "dot_product":
        return "linear"
    if pairwise == "concatenation":
        return "sorted"
    if not on_cpu:
        return "sdpa"
    if shared:
        return "symmetric"
    return "blocked" if c_q != c_v else "sdpa"


def select_kernel(
    pairwise: str, query: Tensor, key: Tensor, value: Tensor, *, impl: str = "auto"
) -> str:
    """:func:`choose_kernel` for these tensors (``key is query``: the keys are the queries; a
    backward pass follows when grad mode is on and an input requires grad)."""
    grad = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    )
    return choose_kernel(
        pairwise,
        n=query.shape[1],
        m=key.shape[1],
        c_q=query.shape[2],
        c_v=value.shape[2],
        shared=key is query,
        device_type=query.device.type,
        grad=grad,
        autocast_bf16=_autocast_products(query, key, value) is not None,
        impl=impl,
    )


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


# -- the direct kernels: the map as one product, normalised in place ----------------------------


def _logits(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """s · q kᵀ as ``(B, N, M)`` in one product (the scale is the product's alpha)."""
    kt = key.transpose(1, 2)  # (B, C_q, M)
    if scale == 1.0:
        return torch.bmm(query, kt)
    return torch.baddbmm(query.new_zeros(()), query, kt, beta=0.0, alpha=scale)


def _autocast_products(*tensors: Tensor) -> torch.dtype | None:
    """bfloat16 when a bfloat16 autocast is on for the tensors' device (and none is float64),
    else None: the dtype autocast itself runs matrix products in."""
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    if any(t.dtype == torch.float64 for t in tensors):
        return None
    return torch.bfloat16 if torch.get_autocast_dtype(device) == torch.bfloat16 else None


def _direct(pairwise: str, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """The ``"direct"`` kernel: the (B, N, M) map materialised, computed in (at least) float32;
    under a bfloat16 autocast as autocast runs the peers' products (see
    :func:`_direct_autocast`)."""
    if _autocast_products(query, key, value) is not None:
        return _direct_autocast(pairwise, query, key, value, scale)
    acc = _accumulation_dtype(query, key, value)
    m = key.shape[1]
    with _autocast_off(query.device.type):
        q, k, v = query.to(acc), key.to(acc), value.to(acc)
        if pairwise in SOFTMAX_PAIRWISE:
            w = torch.softmax(_logits(q, k, scale), dim=-1)  # (B, N, M)
        elif pairwise == "dot_product":
            w = _logits(q, k, 1.0 / m)  # (B, N, M): q kᵀ / M
        else:  # concatenation: ReLU(a_i + b_j) / M = ReLU(a_i / M + b_j / M)
            w = torch.add(q / m, (k / m).transpose(1, 2)).relu_()  # (B, N, M)
        out = torch.bmm(w, v)  # (B, N, C_v)
    return out.to(value.dtype)


def _direct_autocast(
    pairwise: str, query: Tensor, key: Tensor, value: Tensor, scale: float
) -> Tensor:
    """The direct kernel under a bfloat16 autocast: its products in bfloat16 (accumulated in
    float32 by the matrix kernel, results rounded to bfloat16, as autocast computes them), a
    softmax's max and sum in float32 inside its kernel. bfloat16 has float32's exponent range,
    so nothing overflows; the map carries bfloat16's 8-bit precision, as the peers' does under
    autocast."""
    dt = torch.bfloat16
    m = key.shape[1]
    with _autocast_off(query.device.type):
        q, k, v = query.to(dt), key.to(dt), value.to(dt)
        if pairwise in SOFTMAX_PAIRWISE:
            w = torch.softmax(_logits(q, k, scale), dim=-1)  # (B, N, M), bfloat16
        elif pairwise == "dot_product":
            w = _logits(q, k, 1.0 / m)  # (B, N, M): q kᵀ / M
        else:  # concatenation
            w = torch.add(q / m, (k / m).transpose(1, 2)).relu_()  # (B, N, M)
        out = torch.bmm(w, v)  # (B, N, C_v)
    return out.to(value.dtype)


def softmax_aggregate(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    impl: str = "auto",
) -> Tensor:
    """Σ_j softmax_j(s · q_iᵀ k_j) v_j.

    Args:
        query: ``(B, N, C_q)``.
        key: ``(B, M, C_q)``; pass the query tensor itself when the keys are the queries (the
            symmetric kernel applies then).
        value: ``(B, M, C_v)``.
        scale: logit scale s (pass 1.0 for unscaled).
        impl: ``"auto"``, ``"fast"``, ``"reference"`` or a kernel of :data:`SOFTMAX_KERNELS`
            (see the module docstring).

    Returns:
        ``(B, N, C_v)``.

    Raises:
        ValueError: unknown ``impl``, or ``"symmetric"`` for keys that are not the queries.
    """
    kernel = select_kernel("embedded_gaussian", query, key, value, impl=impl)
    return _run_softmax(kernel, query, key, value, scale)


def _run_softmax(kernel: str, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    if kernel == "reference":
        return _weighted_sum(_weights("gaussian", query, key, scale), value)
    if kernel == "direct":
        return _direct("gaussian", query, key, value, scale)
    if kernel == "symmetric":
        return symmetric_softmax_aggregate(query, value, scale=scale)
    if kernel == "blocked":
        return chunked_softmax_aggregate(query, key, value, scale=scale)
    return _padded_sdpa(query, key, value, scale)


def _padded_sdpa(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """The fused kernel, with the widths zero-padded where it needs them equal (exact).

    Zero columns of q and k add nothing to the logits; zero columns of v give zero outputs,
    dropped. On the CPU the fused kernel needs equal widths (else it falls back to the
    materialising math kernel); FlashAttention and the memory-efficient CUDA kernel need them
    equal and a multiple of 8.
    """
    c_q, c_v = query.shape[-1], value.shape[-1]
    width = max(c_q, c_v)
    if query.device.type != "cpu":
        width = -(-width // 8) * 8
    if c_q != width:
        shared = key is query
        query = F.pad(query, (0, width - c_q))
        key = query if shared else F.pad(key, (0, width - c_q))
    out = _sdpa(query, key, F.pad(value, (0, width - c_v)) if c_v != width else value, scale)
    return out[..., :c_v] if c_v != width else out


def _sdpa(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    # Inputs whose last dimension is not contiguous (e.g. a transposed (B, C, N) view) make the
    # CPU kernel fall back to the materialising math path: lay those out densely first.
    q = query if query.stride(-1) == 1 else query.contiguous()
    k = q if key is query else (key if key.stride(-1) == 1 else key.contiguous())
    v = value if value.stride(-1) == 1 else value.contiguous()
    out = F.scaled_dot_product_attention(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale
    )  # (B, 1, N, C_v): one head
    return out.squeeze(1)  # (B, N, C_v)


#: Logits (queries × keys) per block of :func:`chunked_softmax_aggregate`: 16 MiB in float32.
ATTENTION_CHUNK_ELEMENTS = 1 << 22


def chunked_softmax_aggregate(
    query: Tensor, key: Tensor, value: Tensor, *, scale: float, chunk: int | None = None
) -> Tensor:
    """Σ_j softmax_j(s · q_iᵀ k_j) v_j, exact, one block of queries at a time.

    Each block holds ``chunk × M`` logits (by default :data:`ATTENTION_CHUNK_ELEMENTS` in all,
    four times as many under a bfloat16 autocast), never the whole N×M map; the backward pass
    recomputes each block from the saved log-sum-exp, as fused attention does. Unlike the fused
    CPU kernel it takes values of any width, so the products cost what the formula needs:
    2·N·M·(C_q + C_v) forward, 2·N·M·(2·C_q + C_v) + 2·N·M·(C_q + C_v) backward. The blocks are
    written into two buffers allocated once per call.

    Precision: half-precision inputs are accumulated in float32; under a bfloat16 autocast the
    products run in bfloat16 as autocast runs them (accumulated in float32 inside the matrix
    kernel, results rounded to bfloat16), while the log-sum-exp, the row sums and the
    accumulated outputs and gradients stay in float32.

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
    products = _autocast_products(query, key, value)
    if chunk is None:
        elements = ATTENTION_CHUNK_ELEMENTS * (4 if products is not None else 1)
        chunk = max(1, elements // key.shape[1])
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedSoftmaxAttention.apply(query, key, value, float(scale), int(chunk), products)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive blocks of ``size`` over ``n`` positions."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _dtypes(products: torch.dtype | None, *tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the products, dtype of the statistics and accumulators) of a blocked kernel."""
    acc = torch.promote_types(tensors[0].dtype, torch.float32)
    for t in tensors[1:]:
        acc = torch.promote_types(acc, t.dtype)
    return (products or acc), acc


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """softmax(s·q kᵀ) v by blocks of queries; backward recomputes the blocks."""

    @staticmethod
    def forward(ctx, query, key, value, scale: float, chunk: int, products):
        out_dtype = value.dtype
        pdt, acc = _dtypes(products, query, key, value)
        with _autocast_off(query.device.type):
            q = query.to(pdt).contiguous()
            k = q if key is query else key.to(pdt).contiguous()
            v = value.to(pdt).contiguous()
            b, n = q.shape[:2]
            m = k.shape[1]
            qs = q * scale  # (B, N, C_q): the scale folded into the queries
            kt = k.transpose(1, 2)  # (B, C_q, M)
            out = torch.empty((b, n, v.shape[-1]), dtype=acc, device=q.device)
            lse = torch.empty((b, n, 1), dtype=acc, device=q.device)
            buf = torch.empty((b, min(chunk, n), m), dtype=pdt, device=q.device)
            for i0, i1 in _spans(n, chunk):
                s = torch.bmm(qs[:, i0:i1], kt, out=buf[:, : i1 - i0])  # (B, n_c, M) logits
                mx = s.amax(dim=-1, keepdim=True)  # (B, n_c, 1)
                p = s.sub_(mx).exp_()  # (B, n_c, M), unnormalised, in place
                l = p.sum(dim=-1, keepdim=True, dtype=acc)  # (B, n_c, 1)
                if pdt == acc:
                    torch.bmm(p, v, out=out[:, i0:i1])  # (B, n_c, C_v)
                else:
                    out[:, i0:i1] = torch.bmm(p, v)
                out[:, i0:i1].div_(l)
                torch.add(mx.to(acc), l.log_(), out=lse[:, i0:i1])  # (B, n_c, 1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.chunk, ctx.shared = scale, chunk, key is query
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        pdt, acc = q.dtype, out.dtype
        with _autocast_off(q.device.type):
            delta = (grad_out.to(acc) * out).sum(dim=-1, keepdim=True)  # (B, N, 1)
            do = grad_out.to(pdt).contiguous()  # (B, N, C_v)
            b, n = q.shape[:2]
            m = k.shape[1]
            qs = q * scale
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, C_q, M), (B, C_v, M)
            dq = torch.empty(q.shape, dtype=acc, device=q.device)
            dk = torch.zeros(k.shape, dtype=acc, device=q.device)
            dv = torch.zeros(v.shape, dtype=acc, device=q.device)
            rows = min(chunk, n)
            p_buf = torch.empty((b, rows, m), dtype=pdt, device=q.device)
            ds_buf = torch.empty((b, rows, m), dtype=pdt, device=q.device)
            same = pdt == acc  # products accumulate in place; else through a product's output
            for i0, i1 in _spans(n, chunk):
                r = i1 - i0
                # Two (B, n_c, M) buffers, updated in place.
                p = torch.bmm(qs[:, i0:i1], kt, out=p_buf[:, :r]).sub_(lse[:, i0:i1]).exp_()
                _accumulate(dv, p.transpose(1, 2), do[:, i0:i1], same)  # dV += pᵀ dO
                ds = torch.bmm(do[:, i0:i1], vt, out=ds_buf[:, :r])
                ds.sub_(delta[:, i0:i1]).mul_(p)  # dL/d(s·q·k), without the scale
                if same:
                    torch.bmm(ds, k, out=dq[:, i0:i1])  # (B, n_c, C_q)
                else:
                    dq[:, i0:i1] = torch.bmm(ds, k)
                _accumulate(dk, ds.transpose(1, 2), qs[:, i0:i1], same)  # dK += s·dSᵀ q
            dq.mul_(scale)
        dq_t, dk_t, dv_t = ctx.dtypes
        if ctx.shared:  # key is query: its gradient is the sum, returned once
            return (dq + dk).to(dq_t), None, dv.to(dv_t), None, None, None
        return dq.to(dq_t), dk.to(dk_t), dv.to(dv_t), None, None, None


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, in_place: bool, alpha: float = 1.0) -> None:
    """``acc += alpha · a @ b``: in place when the dtypes agree, else through the product."""
    if in_place:
        acc.baddbmm_(a, b, alpha=alpha)
    elif alpha == 1.0:
        acc.add_(torch.bmm(a, b))
    else:
        acc.add_(torch.bmm(a, b), alpha=alpha)


#: Side of the square logit tiles of :func:`symmetric_softmax_aggregate` (256 KiB in float32):
#: small enough that the elementwise passes over a tile run from the core's cache.
SYMMETRIC_TILE = 256
#: The tile side under a bfloat16 autocast, where every tile's products are added to float32
#: accumulators (a tile × width pass each): larger tiles make those passes rarer.
SYMMETRIC_TILE_BF16 = 1024


def symmetric_softmax_aggregate(
    x: Tensor, value: Tensor, *, scale: float, tile: int | None = None
) -> Tensor:
    """Σ_j softmax_j(s · x_iᵀ x_j) v_j when the keys are the queries, exact, by tiles.

    The logits S = s·X Xᵀ are symmetric, so one ``tile × tile`` block S_IJ (I ≤ J) gives both
    the (I, J) and the (J, I) blocks of the map: its rows for the queries of I, its columns for
    those of J, each through an online softmax (running max and sum per query, as in flash
    attention), without the N×N map and without transposing a tile. The backward pass
    recomputes each S_IJ once and sends the gradient of both blocks through it:
    dX_I += s·G X_J and dX_J += s·Gᵀ X_I with G = dS_IJ + dS_JIᵀ, where dS_JIᵀ is computed
    in the (I, J) orientation from V_I dO_Jᵀ. Products: 2·N²·(2·C + 3·C_v) in all against
    2·N²·(3·C + 3·C_v) for the materialised map (gaussian: C = 512, C_v = 256: 0.78×). The
    tiles live in a few buffers allocated once per call, so even the first call allocates no
    more than a handful of tensors. Precision as :func:`chunked_softmax_aggregate` (bfloat16
    products under a bfloat16 autocast, float32 statistics and accumulators).

    Args:
        x: ``(B, N, C)`` queries, which are also the keys.
        value: ``(B, N, C_v)``.
        scale: logit scale s.
        tile: side of the logit tiles; :data:`SYMMETRIC_TILE` by default
            (:data:`SYMMETRIC_TILE_BF16` under a bfloat16 autocast).

    Returns:
        ``(B, N, C_v)``.
    """
    products = _autocast_products(x, value)
    if tile is None:
        tile = SYMMETRIC_TILE if products is None else SYMMETRIC_TILE_BF16
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if value.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"value must have the positions of x, got x {tuple(x.shape)} and value "
            f"{tuple(value.shape)}"
        )
    return _SymmetricSoftmaxAttention.apply(x, value, float(scale), int(tile), products)


def _fold_rows(s: Tensor, m: Tensor, l: Tensor, o: Tensor, v: Tensor, p: Tensor) -> None:
    """Online softmax: fold logits ``s`` (B, n_i, n_j) over keys ``v`` into the rows' state.

    ``m``, ``l`` ``(B, n_i, 1)`` and ``o`` ``(B, n_i, C_v)`` (the statistics' dtype) are updated
    in place; ``p`` is a buffer of the shape and dtype of ``s``.
    """
    m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (B, n_i, 1)
    alpha = (m - m_new).exp_()  # (B, n_i, 1): rescales what was accumulated
    torch.sub(s, m_new, out=p).exp_()  # (B, n_i, n_j)
    l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True, dtype=l.dtype))
    _accumulate(o.mul_(alpha), p, v, p.dtype == o.dtype)
    m.copy_(m_new)


def _fold_columns(s: Tensor, m: Tensor, l: Tensor, o: Tensor, v: Tensor) -> None:
    """:func:`_fold_rows` for the columns of ``s``: the queries of its second tile.

    ``m``, ``l`` ``(B, n_j, 1)``, ``o`` ``(B, n_j, C_v)``, ``v`` ``(B, n_i, C_v)``; ``s`` is
    overwritten.
    """
    m_new = torch.maximum(m, s.amax(dim=-2).unsqueeze(-1))  # (B, n_j, 1)
    alpha = (m - m_new).exp_()  # (B, n_j, 1)
    p = s.sub_(m_new.transpose(1, 2)).exp_()  # (B, n_i, n_j): columns normalised per query
    l.mul_(alpha).add_(p.sum(dim=-2, dtype=l.dtype).unsqueeze(-1))
    _accumulate(o.mul_(alpha), p.transpose(1, 2), v, p.dtype == o.dtype)
    m.copy_(m_new)


class _SymmetricSoftmaxAttention(torch.autograd.Function):
    """softmax(s·x xᵀ) v over tiles I ≤ J of the symmetric logits; backward recomputes them."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, scale: float, tile: int, products):
        out_dtype = value.dtype
        pdt, acc = _dtypes(products, x, value)
        with _autocast_off(x.device.type):
            xa = x.to(pdt).contiguous()
            va = value.to(pdt).contiguous()
            xs = xa * scale  # (B, N, C): the scale folded into one side of every product
            b, n = xa.shape[:2]
            t = min(tile, n)
            m = torch.full((b, n, 1), -math.inf, dtype=acc, device=x.device)
            l = torch.zeros((b, n, 1), dtype=acc, device=x.device)
            o = torch.zeros((b, n, va.shape[-1]), dtype=acc, device=x.device)
            s_buf = torch.empty((b, t, t), dtype=pdt, device=x.device)
            p_buf = torch.empty((b, t, t), dtype=pdt, device=x.device)
            spans = _spans(n, t)
            for ii, (i0, i1) in enumerate(spans):
                for j0, j1 in spans[ii:]:
                    ni, nj = i1 - i0, j1 - j0
                    xj = xa[:, j0:j1].transpose(1, 2)  # (B, C, n_j)
                    s = torch.bmm(xs[:, i0:i1], xj, out=s_buf[:, :ni, :nj])  # S_IJ
                    rows = (m[:, i0:i1], l[:, i0:i1], o[:, i0:i1])
                    _fold_rows(s, *rows, va[:, j0:j1], p_buf[:, :ni, :nj])
                    if j0 != i0:  # S_JI = S_IJᵀ: the columns serve the queries of J
                        _fold_columns(s, m[:, j0:j1], l[:, j0:j1], o[:, j0:j1], va[:, i0:i1])
            out = o.div_(l)  # (B, N, C_v)
            lse = m.add_(l.log_())  # (B, N, 1)
        ctx.save_for_backward(xa, va, out, lse)
        ctx.scale, ctx.tile, ctx.dtypes = scale, tile, (x.dtype, value.dtype)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xa, va, out, lse = ctx.saved_tensors
        scale, tile = ctx.scale, ctx.tile
        pdt, acc = xa.dtype, out.dtype
        same = pdt == acc
        with _autocast_off(xa.device.type):
            delta = (grad_out.to(acc) * out).sum(dim=-1, keepdim=True)  # (B, N, 1)
            do = grad_out.to(pdt).contiguous()  # (B, N, C_v)
            xs = xa * scale
            b, n = xa.shape[:2]
            t = min(tile, n)
            dx = torch.zeros(xa.shape, dtype=acc, device=xa.device)
            dv = torch.zeros(va.shape, dtype=acc, device=xa.device)
            bufs = [torch.empty((b, t, t), dtype=pdt, device=xa.device) for _ in range(3)]
            lse_t, delta_t = lse.transpose(1, 2), delta.transpose(1, 2)  # (B, 1, N)
            spans = _spans(n, t)
            for ii, (i0, i1) in enumerate(spans):
                xi, vi, doi = xs[:, i0:i1], va[:, i0:i1], do[:, i0:i1]  # xi holds the scale
                for j0, j1 in spans[ii:]:
                    ni, nj = i1 - i0, j1 - j0
                    s_b, c_b, d_b = (buf[:, :ni, :nj] for buf in bufs)
                    xj, vj, doj = xa[:, j0:j1], va[:, j0:j1], do[:, j0:j1]
                    s = torch.bmm(xi, xj.transpose(1, 2), out=s_b)  # (B, n_i, n_j): S_IJ
                    if j0 == i0:
                        p = s.sub_(lse[:, i0:i1]).exp_()  # P_II
                        _accumulate(dv[:, i0:i1], p.transpose(1, 2), doi, same)
                        ds = torch.bmm(doi, vi.transpose(1, 2), out=d_b)
                        ds.sub_(delta[:, i0:i1]).mul_(p)  # dS_II
                        g = torch.add(ds, ds.transpose(1, 2), out=c_b)  # both places of a logit
                        _accumulate(dx[:, i0:i1], g, xi, same)
                        continue
                    pc = torch.sub(s, lse_t[:, :, j0:j1], out=c_b).exp_()  # P_JIᵀ
                    p = s.sub_(lse[:, i0:i1]).exp_()  # P_IJ
                    _accumulate(dv[:, j0:j1], p.transpose(1, 2), doi, same)  # += P_IJᵀ dO_I
                    _accumulate(dv[:, i0:i1], pc, doj, same)  # dV_I += P_JIᵀ dO_J
                    ds = torch.bmm(doi, vj.transpose(1, 2), out=d_b)
                    ds.sub_(delta[:, i0:i1]).mul_(p)  # dS_IJ
                    dsc = torch.bmm(vi, doj.transpose(1, 2), out=s)  # (dO_J V_Iᵀ)ᵀ
                    g = ds.add_(dsc.sub_(delta_t[:, :, j0:j1]).mul_(pc))  # dS_IJ + dS_JIᵀ
                    _accumulate(dx[:, i0:i1], g, xj, same, alpha=scale)
                    _accumulate(dx[:, j0:j1], g.transpose(1, 2), xi, same)
        x_t, v_t = ctx.dtypes
        return dx.to(x_t), dv.to(v_t), None, None, None


def dot_product_aggregate(
    query: Tensor, key: Tensor, value: Tensor, *, impl: str = "auto"
) -> Tensor:
    """Σ_j (q_iᵀ k_j) v_j / M.

    Args:
        query: ``(B, N, C_q)``.
        key: ``(B, M, C_q)``.
        value: ``(B, M, C_v)``.
        impl: ``"auto"``, ``"fast"``, ``"reference"`` or a kernel: ``"linear"`` (right to left,
            q (kᵀv) / M) or ``"direct"``.

    Returns:
        ``(B, N, C_v)``.
    """
    kernel = select_kernel("dot_product", query, key, value, impl=impl)
    if kernel == "reference":
        return _weighted_sum(_weights("dot_product", query, key, 1.0), value)
    if kernel == "direct":
        return _direct("dot_product", query, key, value, 1.0)
    # kᵀv sums over all M keys: accumulate half and bfloat16 in float32, where it cannot
    # overflow (float16 tops out at 65504).
    acc = _accumulation_dtype(query, key, value)
    with _autocast_off(query.device.type):
        q, k, v = query.to(acc), key.to(acc), value.to(acc)
        kv = torch.bmm(k.transpose(1, 2), v)  # (B, C_q, C_v)
        out = torch.bmm(q, kv.div_(key.shape[1]))  # (B, N, C_v)
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


def concatenation_aggregate(a: Tensor, b: Tensor, value: Tensor, *, impl: str = "auto") -> Tensor:
    """Σ_j ReLU(a_i + b_j) v_j / M.

    Args:
        a: ``(B, N, 1)`` query terms w_θᵀθ(x_i).
        b: ``(B, M, 1)`` key terms w_φᵀφ(x_j).
        value: ``(B, M, C_v)``.
        impl: ``"auto"``, ``"fast"``, ``"reference"`` or a kernel: ``"sorted"`` (sort + prefix
            sums + binary search) or ``"direct"``.

    Returns:
        ``(B, N, C_v)``.
    """
    if a.shape[-1] != 1 or b.shape[-1] != 1:
        raise ValueError(
            f"concatenation takes scalar query/key terms of shape (B, N, 1) and (B, M, 1), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    kernel = select_kernel("concatenation", a, b, value, impl=impl)
    if kernel == "reference":
        return _weighted_sum(_weights("concatenation", a, b, 1.0), value)
    out_dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), value.dtype)
    if kernel == "direct":
        return _direct("concatenation", a, b, value, 1.0).to(out_dtype)
    m = b.shape[1]
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
    impl: str = "auto",
    validate: bool = True,
) -> Tensor:
    """y_i = 1/C(x) Σ_j f(q_i, k_j) v_j for any pairwise function of the NL paper.

    Args:
        pairwise: one of :data:`PAIRWISE`.
        query: ``(B, N, C_q)``; for concatenation ``(B, N, 1)`` holding a_i.
        key: ``(B, M, C_q)``; for concatenation ``(B, M, 1)`` holding b_j. Pass the query
            tensor itself when the keys are the queries.
        value: ``(B, M, C_v)``.
        scale: logit scale of the softmax forms (see :func:`default_scale`).
        impl: ``"auto"`` (default), ``"fast"``, ``"reference"`` or one of ``KERNELS[pairwise]``
            (see the module docstring).
        validate: check the tokens' shapes and dtypes (a block that built them itself from a
            checked input passes False: the checks cost more than a small map's products).

    Returns:
        ``(B, N, C_v)``.

    Raises:
        ValueError: unknown ``pairwise``/``impl``, a kernel that does not apply, mismatched
            shapes, empty dimensions.
        TypeError: non-tensor or non-floating inputs.
    """
    compiling = torch.compiler.is_compiling()
    if validate:
        check_choice("pairwise", pairwise, PAIRWISE)
        _check_qkv(query, key, value, same_dim=True)
        # (skipped while torch.compile traces: Dynamo may see scale as a symbolic float)
        if not compiling and not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    kernel = select_kernel(pairwise, query, key, value, impl=impl)
    if not compiling and _log.isEnabledFor(logging.DEBUG):
        _log.debug(
            "%s, impl=%r: kernel %r for B=%d, N=%d, M=%d, C_q=%d, C_v=%d on %s",
            pairwise,
            impl,
            kernel,
            query.shape[0],
            query.shape[1],
            key.shape[1],
            query.shape[2],
            value.shape[2],
            query.device,
        )
    if pairwise in SOFTMAX_PAIRWISE:
        return _run_softmax(kernel, query, key, value, scale)
    if pairwise == "dot_product":
        return dot_product_aggregate(query, key, value, impl=kernel)
    return concatenation_aggregate(query, key, value, impl=kernel)
