"""The non-local block of Wang, Girshick, Gupta and He, *Non-local Neural Networks* (CVPR 2018).

    y_i = 1/C(x) · Σ_j f(x_i, x_j) · g(x_j)
    z_i = BN(W_z y_i) + x_i

One implementation serves 1d ``(B, C, L)``, 2d ``(B, C, H, W)`` and 3d ``(B, C, T, H, W)``
inputs: the convolutions are 1×1(×1), and the positions are flattened into tokens before the
functional core (:mod:`nonlocalnet.functional`) aggregates them.

Sub-sampling (``sub_sample=True``) max-pools the key/value side only (φ and g; θ keeps all N
queries) with a window and stride of 2 (1d), 2×2 (2d) or 1×2×2 (3d, never in time). On odd
sizes the pooling rounds *up* by default (``sub_sample_rounding="ceil"``): the last window is
partial (``ceil_mode``), so every position feeds some key, a size-1 dimension stays 1, and
M = ⌈H/2⌉·⌈W/2⌉ (times T in 3d). The official code, mmcv, SlowFast and pytorchvideo round
*down* (``sub_sample_rounding="floor"``, plain max pooling): M = ⌊H/2⌋·⌊W/2⌋, the positions of a
last odd row/column feed no key, and every pooled axis needs at least 2 positions. On even sizes
the two agree; on a 7×9 map they do not (20 keys against 12), so converted peer weights are
reproduced exactly with ``"floor"``.

Two paths (``impl``). The reference runs the paper's convolutions and materialises the map.
The fast path (every other ``impl``; ``"auto"`` by default) computes θ, φ, g and W_z with the
same weights as matrix products over all B·N positions at once (a 1×1 convolution on the CPU
runs one product per sample: slow for small maps in large batches); with one sample it reads
the map as it lies and writes W_z's output in map layout, so no copy transposes anything; the
aggregation is the kernel :mod:`nonlocalnet.functional` dispatches to for the shapes, dtype
and device (:meth:`NonLocalNd.kernel_for` tells which; ``impl`` can name one); and in eval mode
a BatchNorm folds into W_z. Efficient attention (Shen et al., 2021) is a fifth pairwise form,
``pairwise="efficient"``: θ, φ, g as for the embedded Gaussian, y = ρ_q(θ)(ρ_k(φ)ᵀ g).

The forward pass traces with :mod:`torch.fx` (``create_feature_extractor``): the input checks
stand aside while tracing, sizes are read axis by axis, and the functional core
:func:`~nonlocalnet.functional.aggregate` and the projections are leaf calls of the graph
(their choices read sizes and dtypes at run time).

:meth:`NonLocalNd.layout` describes the folding of queries (by the extent) and the cell of input
positions behind each key; the block lays its own tokens out through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocalnet._checks import (
    autocast_enabled,
    check_choice,
    check_feature_map,
    is_tracing,
    query_index,
)
from nonlocalnet.functional import (
    DISPATCH_IMPLS,
    PAIRWISE,
    aggregate,
    choose_kernel,
    default_scale,
    impl_choices,
    pairwise_weights,
)
from nonlocalnet.layers._dims import (
    BATCH_NORM,
    CONV,
    MAX_POOL,
    autocast_input,
    check_batch_norm_values,
    check_dims,
    check_positive_int,
    eval_batch_norm_affine,
    linear_1x1s,
    project_map,
    project_tokens,
)
from nonlocalnet.layers.efficient_attention import efficient_aggregate, efficient_weights
from nonlocalnet.layers.layout import ROUNDINGS, AttentionLayout, spatial_size

__all__ = [
    "EXTENTS",
    "NL_PAIRWISE",
    "SUB_SAMPLE_ROUNDINGS",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "NonLocalNd",
]

# The functional core is one leaf call under torch.fx symbolic tracing: its kernel choice reads
# devices, dtypes and sizes, which are proxies there.
torch.fx.wrap("aggregate")
torch.fx.wrap("efficient_aggregate")
torch.fx.wrap("autocast_input")
torch.fx.wrap("linear_1x1s")
torch.fx.wrap("project_tokens")
torch.fx.wrap("project_map")

#: pairwise functions of the block: the four of the NL paper, and efficient attention
#: (Shen et al., 2021: ρ_q(θ)(ρ_k(φ)ᵀ g), the linear member of the family).
NL_PAIRWISE = (*PAIRWISE, "efficient")
#: kernels of the efficient form: the implied map materialised, or the global context first.
EFFICIENT_KERNELS = ("direct", "context")

EXTENTS = ("spacetime", "space", "time")
SUB_SAMPLE_POSITIONS = ("after", "before")
#: rounding of the sub-sampling on odd sizes: ``"ceil"`` (default) or ``"floor"`` (the peers').
SUB_SAMPLE_ROUNDINGS = ROUNDINGS

#: max-pooling window (= stride) of the key/value side, per dims: never in time.
POOL_WINDOW = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
#: axes of (T, H, W) each extent folds into the batch: frames for "space", pixels for "time".
FOLD_DIMS = {"spacetime": (), "space": (0,), "time": (1, 2)}


class NonLocalNd(nn.Module):
    """Non-local block for inputs with ``dims`` dimensions after (B, C).

    :class:`NonLocal1d`, :class:`NonLocal2d` and :class:`NonLocal3d` fix ``dims``.

    Implementations (``impl``): ``"reference"`` follows the paper literally (the θ, φ, g and W_z
    convolutions, the N×M map materialised); every other choice runs the fast path: θ, φ and g
    as matrix products over all B·N positions of one token layout of x (one product where a
    convolution runs one per sample), the aggregation by the kernel the dispatcher of
    :mod:`nonlocalnet.functional` picks for the shapes, dtype and device (``"auto"``, the
    default: the direct product while the map is small, O(N)-memory kernels once it is large;
    ``"fast"``: always an O(N)-memory kernel), or the kernel named (``impl="sdpa"``,
    ``"blocked"``, ``"symmetric"``, ``"direct"``, ``"linear"``, ``"sorted"``, and for
    ``pairwise="efficient"`` ``"direct"`` or ``"context"``), and W_z as one product, with an
    eval-mode BatchNorm folded into it. :meth:`kernel_for` tells which kernel an input gets.

    Args:
        channels: input and output channels C.
        inner_channels: width C' of θ, φ and g; defaults to ``channels // 2``.
        pairwise: ``"gaussian"``, ``"embedded_gaussian"``, ``"dot_product"``,
            ``"concatenation"`` or ``"efficient"`` (efficient attention, Shen et al. 2021:
            y = ρ_q(θ)(ρ_k(φ)ᵀ g), ρ_q a softmax over the channels of each query, ρ_k over the
            positions of each key channel; see :mod:`~nonlocalnet.layers.efficient_attention`).
        use_scale: scale the softmax logits by d^-1/2 (d = C' for embedded_gaussian, C for
            gaussian). ``None``: on for embedded_gaussian (official code), off for gaussian
            (paper). Must not be True for dot_product/concatenation/efficient.
        sub_sample: max-pool the key/value side (see the module docstring).
        sub_sample_position: ``"after"`` pools the outputs of φ and g (paper); ``"before"`` pools
            x before the φ and g convolutions (official code; cheaper).
        sub_sample_rounding: on odd sizes, ``"ceil"`` (default: the last window is partial, so
            every position feeds a key and a size-1 dimension stays 1) or ``"floor"`` (the
            official code, mmcv, SlowFast, pytorchvideo: the last odd row/column feeds no key;
            each pooled axis needs at least 2 positions). See the module docstring.
        norm: ``True`` for a BatchNorm after W_z, ``False`` for none, or a callable
            ``norm(channels) -> nn.Module``.
        zero_init: start the block as the identity: the norm's weight is zeroed, or, without a
            norm, W_z's weight and bias.
        impl: ``"auto"`` (default), ``"fast"``, ``"reference"`` or a kernel name (above).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        extent: which positions attend to which, for 3d inputs: ``"spacetime"`` (all T·H·W),
            ``"space"`` (within each frame) or ``"time"`` (across frames at each pixel).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        inner_channels: int | None = None,
        pairwise: str = "embedded_gaussian",
        use_scale: bool | None = None,
        sub_sample: bool = False,
        sub_sample_position: str = "after",
        norm: bool | Callable[[int], nn.Module] = True,
        zero_init: bool = True,
        impl: str = "auto",
        *,
        dims: int = 2,
        extent: str = "spacetime",
        sub_sample_rounding: str = "ceil",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_dims(dims, owner=name)
        check_positive_int(name, "channels", channels)
        if inner_channels is None:
            inner_channels = max(channels // 2, 1)
        check_positive_int(name, "inner_channels", inner_channels)
        check_choice("pairwise", pairwise, NL_PAIRWISE, owner=name)
        check_choice("sub_sample_position", sub_sample_position, SUB_SAMPLE_POSITIONS, owner=name)
        check_choice("sub_sample_rounding", sub_sample_rounding, SUB_SAMPLE_ROUNDINGS, owner=name)
        check_choice("impl", impl, _impl_choices(pairwise), owner=name)
        check_choice("extent", extent, EXTENTS, owner=name)
        for flag, value in (("sub_sample", sub_sample), ("zero_init", zero_init)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {flag} must be a bool, got {value!r}")
        if use_scale is not None and not isinstance(use_scale, bool):
            raise TypeError(f"{name}: use_scale must be None or a bool, got {use_scale!r}")
        if extent != "spacetime" and dims != 3:
            raise ValueError(f"{name}: extent {extent!r} needs 3d (B, C, T, H, W) inputs")
        if impl == "symmetric" and (pairwise != "gaussian" or sub_sample):
            raise ValueError(
                f"{name}: impl='symmetric' needs keys that are the queries: pairwise='gaussian' "
                f"without sub-sampling, got pairwise={pairwise!r}, sub_sample={sub_sample}"
            )
        if pairwise == "efficient":
            if use_scale:
                raise ValueError(
                    f"{name}: use_scale applies to the softmax forms (gaussian, "
                    f"embedded_gaussian), got use_scale=True with pairwise='efficient'"
                )
            self.scale = 1.0
        else:
            dot_dim = channels if pairwise == "gaussian" else inner_channels
            try:
                self.scale = default_scale(pairwise, dot_dim, use_scale)  # validates use_scale
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

        self.dims = dims
        self.channels = channels
        self.inner_channels = inner_channels
        self.pairwise = pairwise
        self.use_scale = use_scale
        self.sub_sample = sub_sample
        self.sub_sample_position = sub_sample_position
        self.sub_sample_rounding = sub_sample_rounding
        self.zero_init = zero_init
        self.impl = impl
        self.extent = extent

        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.g = conv(channels, inner_channels, **kw)
        if pairwise != "gaussian":
            self.theta = conv(channels, inner_channels, **kw)
            self.phi = conv(channels, inner_channels, **kw)
        if pairwise == "concatenation":
            # w_f of f = ReLU(w_fᵀ[θ(x_i); φ(x_j)]): the first C' inputs weigh θ, the rest φ.
            self.concat_project = conv(2 * inner_channels, 1, bias=False, **kw)
        self.conv_out = conv(inner_channels, channels, **kw)  # W_z
        if norm is True:
            self.norm: nn.Module | None = BATCH_NORM[dims](channels, device=device, dtype=dtype)
        elif norm is False or norm is None:
            self.norm = None
        elif callable(norm):
            self.norm = norm(channels)
        else:
            raise TypeError(f"{name}: norm must be a bool or a callable, got {type(norm).__name__}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the official code does; zero-init last, so the block is the identity."""
        for m in (
            getattr(self, n, None) for n in ("theta", "phi", "g", "concat_project", "conv_out")
        ):
            if m is None:
                continue
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.norm is not None and hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()
        if not self.zero_init:
            return
        target = (
            self.norm
            if self.norm is not None and getattr(self.norm, "weight", None) is not None
            else None
        )
        with torch.no_grad():
            if target is not None:
                target.weight.zero_()
            else:
                self.conv_out.weight.zero_()
                if self.conv_out.bias is not None:
                    self.conv_out.bias.zero_()

    # -- layout -------------------------------------------------------------------------------

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """How an input of spatial size ``size`` is laid out as queries and keys.

        The extent folds frames (``"space"``) or pixels (``"time"``) into the batch, and
        sub-sampling makes each key the max-pooling window it reads. :meth:`embed` folds its maps
        through this layout, so ``attention_map(x)[fold, index]`` is the row of the query that
        ``layout(x.shape[2:]).locate`` places there.

        Raises:
            ValueError: ``size`` does not have ``dims`` positive entries.
        """
        size = tuple(size)
        if len(size) != self.dims:
            raise ValueError(
                f"{type(self).__name__}.layout: size must have {self.dims} dims, got {size}"
            )
        window = POOL_WINDOW[self.dims] if self.sub_sample else None
        return AttentionLayout.pairwise(
            size,
            window=window,
            fold_dims=FOLD_DIMS[self.extent],
            rounding=self.sub_sample_rounding,
        )

    def _pool(self, t: Tensor) -> Tensor:
        window = POOL_WINDOW[self.dims]
        ceil = self.sub_sample_rounding == "ceil"
        return MAX_POOL[self.dims](t, window, window, ceil_mode=ceil)

    def _check(self, x: Tensor) -> None:
        name = type(self).__name__
        w = self.g.weight  # the parameters' placement (every parameter shares it)
        dtype, device = w.dtype, w.device
        check_feature_map(
            x,
            spatial_dims=self.dims,
            channels=self.channels,
            owner=name,
            dtype=dtype,
            device=device,
        )
        if is_tracing(x):
            return
        size = tuple(x.shape[2:])
        if self.sub_sample and self.sub_sample_rounding == "floor":
            window = POOL_WINDOW[self.dims]
            if any(n < w for n, w in zip(size, window, strict=True)):
                raise ValueError(
                    f"{name}: sub_sample_rounding='floor' pools windows of {window} and needs at "
                    f"least that many positions along each axis, got spatial size {size}; "
                    f"use sub_sample_rounding='ceil' for such inputs"
                )
        check_batch_norm_values(self, x, name)

    # -- kernel choice ------------------------------------------------------------------------

    def kernel_for(self, x: Tensor) -> str:
        """The kernel that aggregates ``x`` with this block's ``impl`` (no computation).

        The choice depends on the sizes, the device, and whether a backward pass will follow
        (grad mode on, and x or a parameter requiring grad), as in the forward pass.

        Args:
            x: ``(B, C, *S)`` input (only its shape, device and ``requires_grad`` are read).

        Returns:
            ``"reference"`` or a kernel name: ``"direct"``, ``"sdpa"``, ``"blocked"``,
            ``"symmetric"``, ``"linear"``, ``"sorted"``, or for ``pairwise="efficient"``
            ``"direct"``/``"context"``.
        """
        self._check(x)
        lay = self.layout(tuple(x.shape[2:]))
        n, m, c = lay.num_queries, lay.num_keys, self.inner_channels
        check_choice("impl", self.impl, _impl_choices(self.pairwise), owner=type(self).__name__)
        if self.pairwise == "efficient":
            return _efficient_kernel(self.impl, n, m, c, c)
        c_q = {"gaussian": self.channels, "concatenation": 1}.get(self.pairwise, c)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        return choose_kernel(
            self.pairwise,
            n=n,
            m=m,
            c_q=c_q,
            c_v=c,
            shared=self.pairwise == "gaussian" and not self.sub_sample,
            device_type=x.device.type,
            grad=grad,
            autocast_bf16=autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
            and x.dtype != torch.float64,
            impl=self.impl,
        )

    # -- the embeddings -----------------------------------------------------------------------

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of the functional core, as tokens.

        The reference computes them with the θ, φ, g convolutions; the fast path with the same
        weights as matrix products on the tokens of x (and, for concatenation, the scalars a_i
        and b_j directly: see :meth:`_concat_terms`).

        Args:
            x: ``(B, C, *S)`` input.

        Returns:
            ``(query, key, value)``: ``(B', N, d)``, ``(B', M, d)``, ``(B', M, C')`` where d is C
            (gaussian), C' (embedded_gaussian, dot_product, efficient) or 1 (concatenation: a_i
            and b_j), folded as :meth:`layout` says.
        """
        q, k, v, _ = self._embed(x)
        return q, k, v

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, AttentionLayout]:
        """:meth:`embed`, and the layout it used."""
        self._check(x)
        lay = self.layout(spatial_size(x, self.dims))
        # unpacked one by one: under torch.fx a traced call's outputs unpack, but do not splat
        if self.impl == "reference":
            q, k, v = self._embed_reference(x, lay)
        else:
            q, k, v = self._embed_fast(x, lay)
        return q, k, v, lay

    def _embed_reference(self, x: Tensor, lay: AttentionLayout) -> tuple[Tensor, Tensor, Tensor]:
        """θ, φ and g as the paper's convolutions, folded into tokens."""
        sub = self.sub_sample
        xk = self._pool(x) if sub and self.sub_sample_position == "before" else x
        value = self.g(xk)
        if sub and self.sub_sample_position == "after":
            value = self._pool(value)
        v = lay.fold_keys(value)  # (B', M, C')
        if self.pairwise == "gaussian":
            query, key = x, (self._pool(x) if sub else x)
        else:
            query, key = self.theta(x), self.phi(xk)
            if sub and self.sub_sample_position == "after":
                key = self._pool(key)
        q = lay.fold(query)  # (B', N, d)
        # gaussian without sub-sampling: keys are the queries; one tensor, laid out once
        k = q if key is query else lay.fold_keys(key)  # (B', M, d)
        if self.pairwise == "concatenation":
            w = self.concat_project.weight.reshape(2 * self.inner_channels, 1)  # (2C', 1)
            q = q @ w[: self.inner_channels]  # (B', N, 1): a_i = w_θᵀ θ(x_i)
            k = k @ w[self.inner_channels :]  # (B', M, 1): b_j = w_φᵀ φ(x_j)
        return q, k, v

    def _pool_tokens(self, t: Tensor, lay: AttentionLayout, batch: int) -> Tensor:
        """Max-pool ``(B', N, C')`` query-side tokens into ``(B', M, C')`` key tokens."""
        return lay.fold_keys(self._pool(lay.unfold(t, batch)))  # via (B, C', *S)

    def _project(
        self,
        lay: AttentionLayout,
        t: Tensor,
        weights: tuple[Tensor, ...],
        biases: tuple[Tensor | None, ...],
        groups: tuple[int, ...] | None = None,
        keys: bool = False,
    ) -> tuple[Tensor, ...]:
        """1×1 convolutions of the map ``t`` (x, or the pooled x when ``keys``), as tokens.

        Without folding, the map is read as it lies (:func:`project_tokens`); folded extents
        lay it out as tokens first (:func:`linear_1x1s`). ``groups``: see there.
        """
        if not lay.fold_dims:
            return project_tokens(t.flatten(2), weights, biases, groups)  # via (B, C, N)
        tokens = lay.fold_keys(t) if keys else lay.fold(t)  # (B', N or M, C)
        return linear_1x1s(autocast_input(tokens.contiguous()), weights, biases, groups)

    def _weights(self, *convs: nn.Module) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """The ``(C_out, C_in)`` matrices and biases of 1×1 convolutions."""
        weights = tuple(m.weight.reshape(m.weight.shape[0], m.weight.shape[1]) for m in convs)
        return weights, tuple(m.bias for m in convs)

    def _embed_fast(self, x: Tensor, lay: AttentionLayout) -> tuple[Tensor, Tensor, Tensor]:
        """θ, φ and g as matrix products over all positions, with the convolutions' weights."""
        sub, batch, c = self.sub_sample, x.shape[0], self.inner_channels
        before = sub and self.sub_sample_position == "before"
        after = sub and self.sub_sample_position == "after"
        if self.pairwise == "gaussian":
            q = lay.fold(x)  # (B', N, C)
            xk = self._pool(x) if sub else None  # (B, C, *grid)
            k = lay.fold_keys(xk) if sub else q  # without sub-sampling: keys are the queries
            (v,) = self._project(lay, xk if before else x, *self._weights(self.g), keys=before)
            return q, k, self._pool_tokens(v, lay, batch) if after else v
        if self.pairwise == "concatenation":
            return self._concat_terms(x, self._pool(x) if before else None, lay)
        if before:
            (q,) = self._project(lay, x, *self._weights(self.theta))  # (B', N, C')
            xk = self._pool(x)  # (B, C, *grid)
            k, v = self._project(lay, xk, *self._weights(self.phi, self.g), keys=True)
            return q, k, v  # (B', M, C') keys and values
        if not after:
            q, k, v = self._project(lay, x, *self._weights(self.theta, self.phi, self.g))
            return q, k, v
        # φ and g pooled together: one pooling of their stacked outputs
        q, kv = self._project(lay, x, *self._weights(self.theta, self.phi, self.g), (1, 2))
        k, v = self._pool_tokens(kv, lay, batch).split(c, dim=-1)  # (B', M, C') each
        return q, k, v

    def _concat_terms(
        self, x: Tensor, xk: Tensor | None, lay: AttentionLayout
    ) -> tuple[Tensor, Tensor, Tensor]:
        """a_i, b_j and g of the concatenation form without the C'-wide θ/φ maps (fast path).

        a_i = w_θᵀ(W_θ x_i + b_θ) = (W_θᵀ w_θ)ᵀ x_i + w_θᵀ b_θ: a C-wide product per position
        replaces the θ convolution. The same holds for b_j unless φ's output is max-pooled
        (``sub_sample_position="after"``), which does not commute with the projection.

        Args:
            x: ``(B, C, *S)`` input.
            xk: the max-pooled input when sub-sampling, else None.
            lay: the layout of the input.
        """
        c, c_in = self.inner_channels, self.channels
        w = self.concat_project.weight.reshape(2, c)  # (2, C'): rows w_θ, w_φ

        def folded(conv: nn.Module, w_f: Tensor) -> tuple[Tensor, Tensor | None]:
            weight = w_f @ conv.weight.reshape(c, c_in)  # (C,)
            bias = (w_f @ conv.bias).reshape(1) if conv.bias is not None else None
            return weight.unsqueeze(0), bias  # (1, C), (1,)

        wa, ba = folded(self.theta, w[0])
        wb, bb = folded(self.phi, w[1])
        if not self.sub_sample:
            a, b = self._project(lay, x, (wa, wb), (ba, bb))  # (B', N, 1) each
            (v,) = self._project(lay, x, *self._weights(self.g))  # (B', N, C')
            return a, b, v
        (a,) = self._project(lay, x, (wa,), (ba,))  # (B', N, 1)
        if self.sub_sample_position == "before":
            (b,) = self._project(lay, xk, (wb,), (bb,), keys=True)  # (B', M, 1)
            (v,) = self._project(lay, xk, *self._weights(self.g), keys=True)  # (B', M, C')
            return a, b, v
        (phi_v,) = self._project(lay, x, *self._weights(self.phi, self.g), (2,))  # (B', N, 2C')
        phi, v = self._pool_tokens(phi_v, lay, x.shape[0]).split(c, dim=-1)  # (B', M, C') each
        return a, phi @ w[1].unsqueeze(-1), v  # b_j = w_φᵀ max-pooled φ: (B', M, 1)

    # -- the operation ------------------------------------------------------------------------

    def _aggregate(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.pairwise == "efficient":
            kernel = _efficient_kernel(self.impl, q.shape[1], k.shape[1], q.shape[2], v.shape[2])
            impl = "fast" if kernel == "context" else "reference"
            return efficient_aggregate(q, k, v, impl=impl)  # (B', N, C')
        validate = self.impl == "reference"  # the fast path's tokens come from a checked input
        return aggregate(
            self.pairwise, q, k, v, scale=self.scale, impl=self.impl, validate=validate
        )

    def _tokens_out(self, x: Tensor) -> tuple[Tensor, AttentionLayout]:
        """y as ``(B', N, C')`` tokens, and the layout."""
        q, k, v, lay = self._embed(x)
        return self._aggregate(q, k, v), lay

    def nonlocal_op(self, x: Tensor) -> Tensor:
        """y = 1/C(x) Σ_j f(x_i, x_j) g(x_j), before W_z: ``(B, C', *S)``."""
        y, lay = self._tokens_out(x)  # (B', N, C')
        return lay.unfold(y, x.shape[0])

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch BN(W_z y), before adding x."""
        if self.impl == "reference":
            z = self.conv_out(self.nonlocal_op(x))
            return self.norm(z) if self.norm is not None else z
        y, lay = self._tokens_out(x)  # (B', N, C')
        weight = self.conv_out.weight.reshape(self.channels, self.inner_channels)  # (C, C')
        affine = eval_batch_norm_affine(self.norm)  # an eval-mode BatchNorm: scale and shift
        if affine is not None:
            scale, shift = affine
            if not lay.fold_dims:
                z = _project_eval_bn(y, weight, self.conv_out.bias, scale, shift)  # (B, C, N)
                return z.view_as(x)  # (B, C, *S)
            weight, bias = _fold_bn(weight, self.conv_out.bias, scale, shift)
            return lay.unfold(F.linear(y, weight, bias), x.shape[0])  # (B, C, *S)
        bias = self.conv_out.bias
        if not lay.fold_dims:
            contiguous = self.norm is not None  # a norm on a contiguous map
            z = project_map(y, weight, bias, contiguous=contiguous).view_as(x)  # (B, C, *S)
        else:
            z = lay.unfold(F.linear(y, weight, bias), x.shape[0])  # (B, C, *S)
            if self.norm is not None:
                z = z.contiguous()
        return z if self.norm is None else self.norm(z)

    def forward(self, x: Tensor) -> Tensor:
        """z = BN(W_z y) + x, same shape as ``x``."""
        return x + self.residual(x)

    @torch.no_grad()
    def attention_map(
        self,
        x: Tensor,
        queries: Sequence[int] | Tensor | None = None,
        chunk_size: int = 1024,
    ) -> Tensor:
        """The normalised pairwise weights f(x_i, x_j)/C(x).

        Computed in chunks of ``chunk_size`` queries, so asking for a few rows of a large input
        allocates only those rows.

        Args:
            x: ``(B, C, *S)`` input.
            queries: query indices in [0, N) within a fold (``layout(x.shape[2:]).locate``
                gives the fold and index of a position); all N when omitted.
            chunk_size: queries per chunk.

        Returns:
            ``(B', len(queries), M)``. B' = B for spacetime (N = T·H·W or H·W or L), B·T for
            ``extent="space"`` (N = H·W per frame), B·H·W for ``extent="time"`` (N = T); key j
            stands for the positions ``layout(x.shape[2:]).key_cells(fold)`` lists. Rows sum to 1
            for the softmax and efficient forms. Computed and returned in (at least) float32.
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"attention_map: chunk_size must be an int >= 1, got {chunk_size!r}")
        q, k, _ = self.embed(x)
        n = q.shape[1]
        idx = query_index(n, queries, q.device)
        dtype = torch.promote_types(q.dtype, torch.float32)
        if self.pairwise == "efficient":
            q, k = q.to(dtype), k.to(dtype)
            rows = [efficient_weights(q[:, chunk], k)[:, 0] for chunk in idx.split(chunk_size)]
        else:
            rows = [
                pairwise_weights(self.pairwise, q[:, chunk], k, scale=self.scale, dtype=dtype)
                for chunk in idx.split(chunk_size)
            ]  # (B', n_c, M) each
        return torch.cat(rows, dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, dims={self.dims}, pairwise={self.pairwise!r}, "
            f"scale={self.scale:.4g}, sub_sample={self.sub_sample}, "
            f"sub_sample_position={self.sub_sample_position!r}, "
            f"sub_sample_rounding={self.sub_sample_rounding!r}, extent={self.extent!r}, "
            f"impl={self.impl!r} (kernel per input: kernel_for(x))"
        )


def _fold_bn(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """W_z and its bias with an eval-mode BatchNorm's per-channel scale and shift folded in."""
    folded = weight * scale.unsqueeze(-1)  # (C, C')
    return folded, (shift if bias is None else torch.addcmul(shift, bias, scale))


def _project_eval_bn(
    y: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> Tensor:
    """BN(W_z y) for ``(B', N, C')`` tokens and an eval-mode BatchNorm, as a ``(B, C, N)`` map.

    Folded into W_z (C×C' products) when the map has at least C' positions; applied to the map
    afterwards (one pass over it, cheaper than the fold for smaller maps) otherwise.
    """
    if y.shape[0] * y.shape[1] >= weight.shape[1]:
        return project_map(y, *_fold_bn(weight, bias, scale, shift), contiguous=False)
    z = project_map(y, weight, bias, contiguous=False)  # (B, C, N)
    return torch.addcmul(shift.unsqueeze(-1), z, scale.unsqueeze(-1))


# a leaf call under torch.fx: its choice reads the sizes
torch.fx.wrap("_project_eval_bn")


def _impl_choices(pairwise: str) -> tuple[str, ...]:
    """What the block's ``impl`` accepts for ``pairwise``."""
    if pairwise == "efficient":
        return (*DISPATCH_IMPLS, *EFFICIENT_KERNELS)
    return impl_choices(pairwise)


def _efficient_kernel(impl: str, n: int, m: int, c_k: int, c_v: int) -> str:
    """The efficient form's kernel: the implied N×M map while it costs fewer products than the
    context ρ_k(K)ᵀV (as the dot product's rule), the context otherwise."""
    if impl in ("reference", *EFFICIENT_KERNELS):
        return impl
    small = n * m * (c_k + c_v) < (n + m) * c_k * c_v
    return "direct" if impl == "auto" and small else "context"


class _FixedDims(NonLocalNd):
    """:class:`NonLocalNd` with ``dims`` fixed by the class."""

    fixed_dims = 2

    def __init__(self, channels: int, *args: object, **kwargs: object) -> None:
        if "dims" in kwargs:
            raise TypeError(
                f"{type(self).__name__}: dims is fixed to {self.fixed_dims}; "
                f"use NonLocalNd(..., dims={kwargs['dims']!r})"
            )
        super().__init__(channels, *args, dims=self.fixed_dims, **kwargs)  # type: ignore[arg-type]


class NonLocal1d(_FixedDims):
    """Non-local block for ``(B, C, L)`` sequences. Arguments as :class:`NonLocalNd`."""

    fixed_dims = 1


class NonLocal2d(_FixedDims):
    """Non-local block for ``(B, C, H, W)`` images. Arguments as :class:`NonLocalNd`."""

    fixed_dims = 2


class NonLocal3d(_FixedDims):
    """Non-local block for ``(B, C, T, H, W)`` videos, with ``extent`` spacetime/space/time.

    Arguments as :class:`NonLocalNd`.
    """

    fixed_dims = 3
