"""Benchmark stand-in: AlexHex7's non-local blocks (embedded Gaussian and Gaussian).

Re-implementation of the forward passes of github.com/AlexHex7/Non-local_pytorch, files
``lib/non_local_embedded_gaussian.py`` and ``lib/non_local_gaussian.py`` at commit
ec15789af4533448169f3dc36abe542badd34221 (2023-04-12; both files last changed in f9002d58),
Apache-2.0. The repository is not a package on PyPI. Same submodules (``g``, ``theta``, ``phi``,
``W``), same operations in the same order; only the constructor is written out per form.

Conventions of that code, which a weight copy must respect:

* no scaling of the logits (embedded Gaussian and Gaussian alike);
* sub-sampling max-pools *after* φ and g (``nn.Sequential(conv, pool)``), window = stride =
  2 / 2×2 / 1×2×2, rounding down on odd sizes (``ceil_mode=False``);
* ``W`` is ``Sequential(conv, BatchNorm)`` with ``bn_layer=True`` (the conv keeps its bias),
  zero-initialised BN weight and bias;
* Gaussian: f = exp(x_iᵀ x_j) on the raw input, no θ/φ convolutions.

This is benchmark code, not part of the library.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["NonLocalBlockND", "make_block"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _max_pool(dimension: int) -> nn.Module:
    if dimension == 3:
        return nn.MaxPool3d(kernel_size=(1, 2, 2))
    if dimension == 2:
        return nn.MaxPool2d(kernel_size=(2, 2))
    return nn.MaxPool1d(kernel_size=2)


class NonLocalBlockND(nn.Module):
    """``_NonLocalBlockND`` of either file: ``mode`` ``"embedded_gaussian"`` or ``"gaussian"``.

    Args:
        in_channels: C.
        inter_channels: C' (default C // 2, at least 1).
        dimension: 1, 2 or 3.
        sub_sample: max-pool φ and g (Gaussian: x and g) after the convolutions.
        bn_layer: BatchNorm after W's convolution.
        mode: which of the two files.
    """

    def __init__(
        self,
        in_channels: int,
        inter_channels: int | None = None,
        dimension: int = 3,
        sub_sample: bool = True,
        bn_layer: bool = True,
        mode: str = "embedded_gaussian",
    ) -> None:
        super().__init__()
        assert dimension in [1, 2, 3]
        assert mode in ("embedded_gaussian", "gaussian")
        self.dimension = dimension
        self.sub_sample = sub_sample
        self.mode = mode
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        if self.inter_channels is None:
            self.inter_channels = in_channels // 2
            if self.inter_channels == 0:
                self.inter_channels = 1
        conv_nd, bn = _CONV[dimension], _BN[dimension]
        max_pool_layer = _max_pool(dimension)

        self.g = conv_nd(self.in_channels, self.inter_channels, kernel_size=1, stride=1, padding=0)
        if bn_layer:
            self.W = nn.Sequential(
                conv_nd(self.inter_channels, self.in_channels, kernel_size=1, stride=1, padding=0),
                bn(self.in_channels),
            )
            nn.init.constant_(self.W[1].weight, 0)
            nn.init.constant_(self.W[1].bias, 0)
        else:
            self.W = conv_nd(self.inter_channels, self.in_channels, kernel_size=1, stride=1)
            nn.init.constant_(self.W.weight, 0)
            nn.init.constant_(self.W.bias, 0)

        if mode == "embedded_gaussian":
            self.theta = conv_nd(self.in_channels, self.inter_channels, kernel_size=1, stride=1)
            self.phi = conv_nd(self.in_channels, self.inter_channels, kernel_size=1, stride=1)
            if sub_sample:
                self.g = nn.Sequential(self.g, max_pool_layer)
                self.phi = nn.Sequential(self.phi, max_pool_layer)
        elif sub_sample:
            self.g = nn.Sequential(self.g, max_pool_layer)
            self.phi = max_pool_layer

    def forward(self, x: Tensor) -> Tensor:
        """z = W(y) + x."""
        batch_size = x.size(0)
        g_x = self.g(x).view(batch_size, self.inter_channels, -1)  # (B, C', M)
        g_x = g_x.permute(0, 2, 1)  # (B, M, C')
        if self.mode == "embedded_gaussian":
            theta_x = self.theta(x).view(batch_size, self.inter_channels, -1)  # (B, C', N)
            theta_x = theta_x.permute(0, 2, 1)  # (B, N, C')
            phi_x = self.phi(x).view(batch_size, self.inter_channels, -1)  # (B, C', M)
        else:
            theta_x = x.view(batch_size, self.in_channels, -1)  # (B, C, N)
            theta_x = theta_x.permute(0, 2, 1)  # (B, N, C)
            if self.sub_sample:
                phi_x = self.phi(x).view(batch_size, self.in_channels, -1)  # (B, C, M)
            else:
                phi_x = x.view(batch_size, self.in_channels, -1)  # (B, C, N)
        f = torch.matmul(theta_x, phi_x)  # (B, N, M)
        f_div_C = F.softmax(f, dim=-1)
        y = torch.matmul(f_div_C, g_x)  # (B, N, C')
        y = y.permute(0, 2, 1).contiguous()  # (B, C', N)
        y = y.view(batch_size, self.inter_channels, *x.size()[2:])  # (B, C', *S)
        W_y = self.W(y)
        z = W_y + x
        return z


def make_block(
    mode: str,
    in_channels: int,
    inter_channels: int,
    dimension: int,
    sub_sample: bool,
) -> NonLocalBlockND:
    """``NONLocalBlock{1,2,3}D(in_channels, inter_channels, sub_sample, bn_layer=True)``."""
    return NonLocalBlockND(
        in_channels,
        inter_channels=inter_channels,
        dimension=dimension,
        sub_sample=sub_sample,
        bn_layer=True,
        mode=mode,
    )
