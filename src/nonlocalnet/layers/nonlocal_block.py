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

The forward pass traces with :mod:`torch.fx` (``create_feature_extractor``): the input checks
stand aside while tracing, sizes are read axis by axis, and the functional core
:func:`~nonlocalnet.functional.aggregate` is one leaf call of the graph.

:meth:`NonLocalNd.layout` describes the folding of queries (by the extent) and the cell of input
positions behind each key; the block lays its own tokens out through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, check_feature_map, is_tracing, query_index
from nonlocalnet.functional import IMPLS, PAIRWISE, aggregate, default_scale, pairwise_weights
from nonlocalnet.layers._dims import (
    BATCH_NORM,
    CONV,
    MAX_POOL,
    check_batch_norm_values,
    check_dims,
    check_positive_int,
    parameter_placement,
)
from nonlocalnet.layers.layout import ROUNDINGS, AttentionLayout, spatial_size

__all__ = [
    "EXTENTS",
    "SUB_SAMPLE_ROUNDINGS",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "NonLocalNd",
]

# The functional core is one leaf call under torch.fx symbolic tracing: its kernel choice reads
# devices, dtypes and sizes, which are proxies there.
torch.fx.wrap("aggregate")

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

    Args:
        channels: input and output channels C.
        inner_channels: width C' of θ, φ and g; defaults to ``channels // 2``.
        pairwise: ``"gaussian"``, ``"embedded_gaussian"``, ``"dot_product"`` or
            ``"concatenation"``.
        use_scale: scale the softmax logits by d^-1/2 (d = C' for embedded_gaussian, C for
            gaussian). ``None``: on for embedded_gaussian (official code), off for gaussian
            (paper). Must not be True for dot_product/concatenation.
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
        impl: ``"fast"`` (never materialises the N×M map) or ``"reference"`` (the formula
            taken literally).
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
        impl: str = "fast",
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
        check_choice("pairwise", pairwise, PAIRWISE, owner=name)
        check_choice("sub_sample_position", sub_sample_position, SUB_SAMPLE_POSITIONS, owner=name)
        check_choice("sub_sample_rounding", sub_sample_rounding, SUB_SAMPLE_ROUNDINGS, owner=name)
        check_choice("impl", impl, IMPLS, owner=name)
        check_choice("extent", extent, EXTENTS, owner=name)
        for flag, value in (("sub_sample", sub_sample), ("zero_init", zero_init)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {flag} must be a bool, got {value!r}")
        if use_scale is not None and not isinstance(use_scale, bool):
            raise TypeError(f"{name}: use_scale must be None or a bool, got {use_scale!r}")
        if extent != "spacetime" and dims != 3:
            raise ValueError(f"{name}: extent {extent!r} needs 3d (B, C, T, H, W) inputs")
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
        dtype, device = parameter_placement(self)
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

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of the functional core, as tokens.

        Args:
            x: ``(B, C, *S)`` input.

        Returns:
            ``(query, key, value)``: ``(B', N, d)``, ``(B', M, d)``, ``(B', M, C')`` where d is C
            (gaussian), C' (embedded_gaussian, dot_product) or 1 (concatenation: a_i and b_j),
            folded as :meth:`layout` says.
        """
        self._check(x)
        lay = self.layout(spatial_size(x, self.dims))
        sub = self.sub_sample
        xk = self._pool(x) if sub and self.sub_sample_position == "before" else x
        value = self.g(xk)
        if sub and self.sub_sample_position == "after":
            value = self._pool(value)
        v = lay.fold_keys(value)  # (B', M, C')
        if self.pairwise == "concatenation" and self.impl == "fast":
            return (*self._concat_terms(x, xk, lay), v)
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

    def _concat_terms(self, x: Tensor, xk: Tensor, lay: AttentionLayout) -> tuple[Tensor, Tensor]:
        """a_i and b_j of the concatenation form without the C'-wide θ/φ maps (fast path).

        a_i = w_θᵀ(W_θ x_i + b_θ) = (W_θᵀ w_θ)ᵀ x_i + w_θᵀ b_θ: a C-wide product per position
        replaces the θ convolution. The same holds for b_j unless φ's output is max-pooled
        (``sub_sample_position="after"``), which does not commute with the projection.
        """
        c, c_in = self.inner_channels, self.channels
        w = self.concat_project.weight.reshape(2, c)  # (2, C'): rows w_θ, w_φ

        def project(tokens: Tensor, conv: nn.Module, w_f: Tensor) -> Tensor:
            weight = w_f @ conv.weight.reshape(c, c_in)  # (C,)
            bias = w_f @ conv.bias if conv.bias is not None else 0.0
            return tokens @ weight.unsqueeze(-1) + bias  # (B', ·, 1)

        a = project(lay.fold(x), self.theta, w[0])  # (B', N, 1)
        if self.sub_sample and self.sub_sample_position == "after":
            phi = lay.fold_keys(self._pool(self.phi(x)))  # (B', M, C')
            b = phi @ w[1].unsqueeze(-1)  # (B', M, 1)
        else:
            b = project(lay.fold_keys(xk), self.phi, w[1])  # (B', M, 1)
        return a, b

    def nonlocal_op(self, x: Tensor) -> Tensor:
        """y = 1/C(x) Σ_j f(x_i, x_j) g(x_j), before W_z: ``(B, C', *S)``."""
        q, k, v = self.embed(x)
        y = aggregate(self.pairwise, q, k, v, scale=self.scale, impl=self.impl)  # (B', N, C')
        return self.layout(spatial_size(x, self.dims)).unfold(y, x.shape[0])

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch BN(W_z y), before adding x."""
        z = self.conv_out(self.nonlocal_op(x))
        return self.norm(z) if self.norm is not None else z

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
            for the softmax forms. Computed and returned in (at least) float32.
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"attention_map: chunk_size must be an int >= 1, got {chunk_size!r}")
        q, k, _ = self.embed(x)
        n = q.shape[1]
        idx = query_index(n, queries, q.device)
        dtype = torch.promote_types(q.dtype, torch.float32)
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
            f"impl={self.impl!r}"
        )


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
