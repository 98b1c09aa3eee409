"""Benchmark stand-in: SlowFast's non-local block (``Nonlocal``).

Re-implementation of ``slowfast/models/nonlocal_helper.py`` of github.com/facebookresearch/SlowFast
at commit 287ec0076846560f44a9327e931a5a2360240533 (2026-03-16; the file last changed in
bac7b672f40d44166a84e8c51d1a5ba367ace816), Apache-2.0. Same submodules (``conv_theta``,
``conv_phi``, ``conv_g``, ``conv_out``, ``bn``, ``pool``), same operations in the same order
(the two ``einsum`` products included).

PyPI has a ``slowfast`` 1.0 wheel (December 2019) whose requirements include detectron2, which
does not install from PyPI; its ``nonlocal_helper.py`` has the same forward (it selects the norm
by ``norm_type`` instead of taking ``norm_module``). :func:`make_block` uses that package when it
is importable, and this stand-in otherwise.

Conventions of that code, which a weight copy must respect:

* 3d only, ``(N, C, T, H, W)``;
* ``instantiation="softmax"`` scales the logits by C'^-1/2 (the official Caffe2 ``USE_SCALE``);
* ``pool_size`` max-pools x *before* φ and g (θ sees all positions), rounding down on odd sizes;
* ``conv_out`` has a bias, followed by ``bn``.

This is benchmark code, not part of the library.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Nonlocal", "make_block", "source"]


class Nonlocal(nn.Module):
    """``Nonlocal(dim, dim_inner, pool_size, instantiation, ...)`` of SlowFast.

    Args:
        dim: C.
        dim_inner: C'.
        pool_size: max-pooling window (= stride) of x before φ and g, e.g. ``[1, 2, 2]``; None or
            all ones: no pooling.
        instantiation: ``"softmax"`` or ``"dot_product"``.
        zero_init_final_conv: flag stored on ``conv_out`` for SlowFast's global init pass.
        zero_init_final_norm: flag stored on ``bn`` for that pass.
        norm_eps: BatchNorm eps.
        norm_momentum: BatchNorm momentum.
        norm_module: the norm class after ``conv_out``.
    """

    def __init__(
        self,
        dim: int,
        dim_inner: int,
        pool_size: list[int] | None = None,
        instantiation: str = "softmax",
        zero_init_final_conv: bool = False,
        zero_init_final_norm: bool = True,
        norm_eps: float = 1e-5,
        norm_momentum: float = 0.1,
        norm_module: type[nn.Module] = nn.BatchNorm3d,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.dim_inner = dim_inner
        self.pool_size = pool_size
        self.instantiation = instantiation
        self.use_pool = False if pool_size is None else any(size > 1 for size in pool_size)
        self.norm_eps = norm_eps
        self.norm_momentum = norm_momentum
        self._construct_nonlocal(zero_init_final_conv, zero_init_final_norm, norm_module)

    def _construct_nonlocal(
        self,
        zero_init_final_conv: bool,
        zero_init_final_norm: bool,
        norm_module: type[nn.Module],
    ) -> None:
        self.conv_theta = nn.Conv3d(self.dim, self.dim_inner, kernel_size=1, stride=1, padding=0)
        self.conv_phi = nn.Conv3d(self.dim, self.dim_inner, kernel_size=1, stride=1, padding=0)
        self.conv_g = nn.Conv3d(self.dim, self.dim_inner, kernel_size=1, stride=1, padding=0)
        self.conv_out = nn.Conv3d(self.dim_inner, self.dim, kernel_size=1, stride=1, padding=0)
        self.conv_out.zero_init = zero_init_final_conv
        self.bn = norm_module(num_features=self.dim, eps=self.norm_eps, momentum=self.norm_momentum)
        self.bn.transform_final_bn = zero_init_final_norm
        if self.use_pool:
            self.pool = nn.MaxPool3d(
                kernel_size=self.pool_size, stride=self.pool_size, padding=[0, 0, 0]
            )

    def forward(self, x: Tensor) -> Tensor:
        """x + bn(conv_out(y))."""
        x_identity = x
        N, _C, T, H, W = x.size()  # SlowFast unpacks C too
        theta = self.conv_theta(x)
        # Temporal-spatial pooling of the key/value side before φ and g.
        if self.use_pool:
            x = self.pool(x)
        phi = self.conv_phi(x)
        g = self.conv_g(x)
        theta = theta.view(N, self.dim_inner, -1)  # (N, C', T·H·W)
        phi = phi.view(N, self.dim_inner, -1)  # (N, C', M)
        g = g.view(N, self.dim_inner, -1)  # (N, C', M)
        theta_phi = torch.einsum("nct,ncp->ntp", (theta, phi))  # (N, T·H·W, M)
        if self.instantiation == "softmax":
            theta_phi = theta_phi * (self.dim_inner**-0.5)
            theta_phi = nn.functional.softmax(theta_phi, dim=2)
        elif self.instantiation == "dot_product":
            spatial_temporal_dim = theta_phi.shape[2]
            theta_phi = theta_phi / spatial_temporal_dim
        else:
            raise NotImplementedError(f"Unknown norm type {self.instantiation}")
        theta_phi_g = torch.einsum("ntg,ncg->nct", (theta_phi, g))  # (N, C', T·H·W)
        theta_phi_g = theta_phi_g.view(N, self.dim_inner, T, H, W)  # (N, C', T, H, W)
        p = self.conv_out(theta_phi_g)
        p = self.bn(p)
        return x_identity + p


def _package_class() -> type[nn.Module] | None:
    """SlowFast's own ``Nonlocal`` when the ``slowfast`` package is importable."""
    try:
        from slowfast.models.nonlocal_helper import Nonlocal as PackageNonlocal
    except ImportError:
        return None
    return PackageNonlocal


def source() -> str:
    """Which code :func:`make_block` builds: the installed package or this stand-in."""
    if _package_class() is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"package slowfast {version('slowfast')}"
        except PackageNotFoundError:
            return "package slowfast (importable, version unknown)"
    return "stand-in benchmarks/peers/slowfast.py (SlowFast 287ec00)"


def make_block(dim: int, dim_inner: int, pool_size: list[int] | None) -> nn.Module:
    """``Nonlocal(dim, dim_inner, pool_size, instantiation="softmax")`` with BatchNorm3d."""
    cls = _package_class() or Nonlocal
    return cls(dim, dim_inner, pool_size=pool_size, instantiation="softmax")
