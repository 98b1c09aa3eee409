"""Expectation-maximisation attention of Li, Zhong, Wu, Yang, Lin and Liu, *Expectation-Maximization
Attention Networks for Semantic Segmentation* (ICCV 2019).

Instead of an N×N map, the N positions attend to K ≪ N bases μ (K = 64), re-estimated for every
input by T = 3 steps of expectation-maximisation, starting from bases μ⁽⁰⁾ kept across inputs:

    E step:  z⁽ᵗ⁾_nk = softmax_k(x_nᵀ μ⁽ᵗ⁻¹⁾_k)                          (responsibilities, N×K)
    M step:  μ⁽ᵗ⁾_k  = normalise(Σ_n z⁽ᵗ⁾_nk x_n / (ε + Σ_n z⁽ᵗ⁾_nk))    (l2 along channels)
    x̃_n = Σ_k z⁽ᵀ⁾_nk μ⁽ᵀ⁾_k                                           (low-rank reconstruction)

with normalise(μ) = μ / (ε + ‖μ‖₂) and ε = 10⁻⁶, as the official code (no temperature λ in the
softmax: the official code has none). The unit (official ``EMAU``) wraps it in convolutions:

    x' = conv1(x)                              (1×1(×1), with bias)
    x̃ = EM(x', μ⁽⁰⁾)
    z  = ReLU(x + BN(conv2(ReLU(x̃))))         (conv2 1×1(×1) without bias)

* **Bases maintenance.** μ⁽⁰⁾ is a buffer ``mu`` ``(1, C, K)``, drawn from N(0, 2/K) and
  l2-normalised along channels. In training mode only, every forward pass moves it towards the
  batch mean of μ⁽ᵀ⁾: μ⁽⁰⁾ ← α μ⁽⁰⁾ + (1 − α) mean_b μ⁽ᵀ⁾ with α = ``momentum`` = 0.9 (the
  official train loop; mmseg writes the same update with ``momentum=0.1`` for 1 − α, and
  l2-normalises the batch mean first). Under ``torch.distributed`` the batch means are averaged
  across processes (as mmseg), so every replica keeps the same bases.
* **No gradient through EM** (``detach_em=True``, official): the iterations and the
  reconstruction run without autograd, so conv1 receives no gradient; it is frozen
  (``requires_grad=False``, as mmseg's ``ema_mid_conv``) so that DistributedDataParallel sees no
  unused parameter. ``detach_em=False`` back-propagates through all T steps instead.
* **Init.** Official: the convolution weights from N(0, 2/C), BatchNorm weight 1. With
  ``zero_init=True`` (the default here) the BatchNorm weight and bias are 0, so the branch is 0
  and the unit returns ReLU(x): the identity on the non-negative inputs it receives after a
  ReLU (a residual stage, or mmseg's ``ema_in_conv``).

Two implementations of the EM core (:func:`em_attention`), exact against each other; both form
the N×K responsibilities, which are the method itself (K ≪ N; there is no N×N map), and differ only
in how they compute: ``impl="reference"`` is the official code line by line (z as N×K, the
normalised copy z / Σz, permuted products); ``impl="fast"`` keeps z as K×N so every product is a
plain batched matrix product without a permuted copy, and divides the C×K bases by Σz instead of
forming a second N×K map.

This module depends on torch alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocalnet._checks import check_choice, query_index
from nonlocalnet.functional import DISPATCH_IMPLS
from nonlocalnet.layers._dims import (
    BATCH_NORM,
    CONV,
    check_block_input,
    check_dims,
    check_positive_int,
)
from nonlocalnet.layers.layout import AttentionLayout

__all__ = ["EMAU", "em_attention", "l2_normalise"]

#: ε of the official code, in the M step's Σz and in the l2 normalisation.
EPS = 1e-6


def l2_normalise(t: Tensor, dim: int) -> Tensor:
    """t / (ε + ‖t‖₂) along ``dim`` (the official ``_l2norm``)."""
    return t / (EPS + t.norm(dim=dim, keepdim=True))


def em_attention(
    x: Tensor, mu: Tensor, *, num_stages: int, impl: str = "fast"
) -> tuple[Tensor, Tensor, Tensor]:
    """T steps of EM on features x from initial bases μ, and the reconstruction x̃ = z μ.

    Args:
        x: ``(B, C, N)`` features.
        mu: ``(B, C, K)`` initial bases μ⁽⁰⁾.
        num_stages: T ≥ 1.
        impl: ``"fast"`` or ``"reference"`` (see the module docstring).

    Returns:
        ``(x̃, z, μ)``: the reconstruction ``(B, C, N)``, the last responsibilities z⁽ᵀ⁾
        ``(B, N, K)`` (rows sum to 1 over the bases) and the bases μ⁽ᵀ⁾ ``(B, C, K)``.

    Raises:
        ValueError: unknown ``impl``, ``num_stages`` < 1 or mismatched shapes.
    """
    check_choice("impl", impl, DISPATCH_IMPLS)
    check_positive_int("em_attention", "num_stages", num_stages)
    if x.dim() != 3 or mu.dim() != 3 or x.shape[:2] != mu.shape[:2]:
        raise ValueError(
            f"em_attention: expected x (B, C, N) and mu (B, C, K) with the same B and C, got "
            f"{tuple(x.shape)} and {tuple(mu.shape)}"
        )
    if impl == "reference":
        for _ in range(num_stages):
            x_t = x.permute(0, 2, 1)  # (B, N, C)
            z = torch.softmax(torch.bmm(x_t, mu), dim=2)  # (B, N, K)
            z_ = z / (EPS + z.sum(dim=1, keepdim=True))  # (B, N, K)
            mu = l2_normalise(torch.bmm(x, z_), dim=1)  # (B, C, K)
        x_rec = torch.bmm(mu, z.permute(0, 2, 1))  # (B, C, N)
        return x_rec, z, mu
    for _ in range(num_stages):
        zt = torch.softmax(torch.bmm(mu.transpose(1, 2), x), dim=1)  # (B, K, N), over K
        mass = zt.sum(dim=2).unsqueeze(1)  # (B, 1, K): Σ_n z_nk
        mu = l2_normalise(torch.bmm(x, zt.transpose(1, 2)) / (EPS + mass), dim=1)  # (B, C, K)
    x_rec = torch.bmm(mu, zt)  # (B, C, N)
    return x_rec, zt.transpose(1, 2), mu


def _mean_across_processes(t: Tensor) -> Tensor:
    """The mean of ``t`` over the processes of the default group (``t`` itself without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


class EMAU(nn.Module):
    """Expectation-maximisation attention unit: z = ReLU(x + BN(conv2(ReLU(EM(conv1(x)))))).

    See the module docstring for the EM steps, the bases buffer and its moving average.

    Args:
        channels: input and output channels C (mmseg's ``ema_channels``, 512 in EMANet).
        num_bases: K, the number of bases.
        num_stages: T, the number of EM steps.
        momentum: α of the moving average of the bases (0.9: keep 90% of the old bases).
        detach_em: run EM and the reconstruction without autograd and freeze conv1 (official);
            ``False`` back-propagates through every step.
        zero_init: zero the BatchNorm's weight and bias, so the branch starts at 0; ``False``
            initialises the BatchNorm weight to 1, as the official code.
        impl: ``"fast"`` or ``"reference"`` (see :func:`em_attention`).
        dims: number of dimensions after (B, C): 1, 2 or 3.
        device: device of the parameters and of the bases.
        dtype: dtype of the parameters and of the bases.

    Submodules and buffers (official names): ``conv1`` (C → C, bias), ``conv2`` (``0``: conv
    C → C without bias, ``1``: BatchNorm), ``mu`` ``(1, C, K)``.
    """

    def __init__(
        self,
        channels: int,
        num_bases: int = 64,
        num_stages: int = 3,
        momentum: float = 0.9,
        detach_em: bool = True,
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
        check_positive_int(name, "num_bases", num_bases)
        check_positive_int(name, "num_stages", num_stages)
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not (0 <= momentum <= 1)
        ):
            raise ValueError(f"{name}: momentum must be a number in [0, 1], got {momentum!r}")
        check_choice("impl", impl, DISPATCH_IMPLS)
        self.channels = channels
        self.num_bases = num_bases
        self.num_stages = num_stages
        self.momentum = float(momentum)
        self.detach_em = detach_em
        self.zero_init = zero_init
        self.impl = impl
        self.dims = dims
        conv = CONV[dims]
        kw = {"kernel_size": 1, "device": device, "dtype": dtype}
        self.conv1 = conv(channels, channels, **kw)
        self.conv2 = nn.Sequential(
            conv(channels, channels, bias=False, **kw),
            BATCH_NORM[dims](channels, device=device, dtype=dtype),
        )
        self.register_buffer("mu", torch.empty(1, channels, num_bases, device=device, dtype=dtype))
        if detach_em:
            self.conv1.requires_grad_(False)  # EM runs without autograd: conv1 gets no gradient
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: conv weights N(0, 2/C), BatchNorm 1 (0 with zero_init), bases
        N(0, 2/K) l2-normalised along channels."""
        self.conv1.reset_parameters()  # the official code keeps conv1's default bias
        bn = self.conv2[1]
        bn.reset_parameters()
        with torch.no_grad():
            for m in (self.conv1, self.conv2[0]):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.out_channels))
            if self.zero_init:
                bn.weight.zero_()
                bn.bias.zero_()
            self.mu.copy_(
                l2_normalise(torch.randn_like(self.mu) * math.sqrt(2.0 / self.num_bases), 1)
            )

    def _check(self, x: Tensor) -> None:
        check_block_input(self, x)

    def em(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """EM on conv1(x) from the kept bases (no buffer update).

        Args:
            x: ``(B, C, *S)`` input.

        Returns:
            ``(x̃, z, μ)``: the reconstruction ``(B, C, *S)``, the responsibilities z⁽ᵀ⁾
            ``(B, N, K)`` and the bases μ⁽ᵀ⁾ ``(B, C, K)``; without autograd when
            ``detach_em``.
        """
        self._check(x)
        feats = self.conv1(x).flatten(2)  # (B, C, N)
        mu = self.mu.repeat(x.shape[0], 1, 1)  # (B, C, K)
        grad = contextlib.nullcontext() if not self.detach_em else torch.no_grad()
        with grad:
            x_rec, z, mu = em_attention(feats, mu, num_stages=self.num_stages, impl=self.impl)
        return x_rec.reshape(x.shape), z, mu

    def _branch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_rec, _, mu = self.em(x)
        return self.conv2(F.relu(x_rec)), mu

    def residual(self, x: Tensor) -> Tensor:
        """BN(conv2(ReLU(x̃))), the branch before the residual addition (no buffer update)."""
        return self._branch(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        """ReLU(x + BN(conv2(ReLU(x̃)))), same shape as ``x``; moves the bases in training."""
        branch, mu = self._branch(x)
        if self.training:
            with torch.no_grad():
                new = _mean_across_processes(mu.detach().mean(dim=0, keepdim=True))  # (1, C, K)
                self.mu.mul_(self.momentum).add_(new.to(self.mu.dtype), alpha=1 - self.momentum)
        return F.relu(x + branch)

    @torch.no_grad()
    def attention_map(
        self, x: Tensor, queries: Sequence[int] | Tensor | None = None, *, over: str = "bases"
    ) -> Tensor:
        """The responsibilities z⁽ᵀ⁾ of the asked positions over the K bases, or their weights
        over the positions through the bases.

        With ``over="positions"``: w_ij = Σ_k z_ik · z_jk / Σ_j' z_j'k, the weight of position j
        in the bases that reconstruct position i (each base μ_k is the z-weighted mean of the
        positions, then l2-normalised; w leaves the normalisation out). Rows sum to 1.

        Args:
            x: ``(B, C, *S)`` input.
            queries: positions in [0, N) (row major); all N when omitted.
            over: ``"bases"`` (``(B, Nq, K)``) or ``"positions"`` (``(B, Nq, N)``).

        Returns:
            The rows; each sums to 1.
        """
        check_choice("over", over, ("bases", "positions"), owner="EMAU")
        _, z, _ = self.em(x)
        idx = query_index(z.shape[1], queries, z.device)
        if over == "bases":
            return z[:, idx]
        share = z / (EPS + z.sum(dim=1, keepdim=True))  # (B, N, K): the bases' weights
        return torch.bmm(z[:, idx], share.transpose(1, 2))  # (B, Nq, N)

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        """The :class:`~nonlocalnet.layers.layout.AttentionLayout` of an input of spatial size
        ``size``: queries on the positions, keys the K bases (``over="positions"``: the
        positions)."""
        return AttentionLayout.bases(size, self.num_bases)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, num_bases={self.num_bases}, num_stages={self.num_stages}, "
            f"momentum={self.momentum}, detach_em={self.detach_em}, dims={self.dims}, "
            f"impl={self.impl!r}"
        )
