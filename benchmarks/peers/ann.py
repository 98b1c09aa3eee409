"""Benchmark stand-in: the official APNB of the ANN paper (Zhu et al., ICCV 2019).

Re-implementation of ``models/seg/utils/apnb.py`` of github.com/MendelXu/ANN at commit
f4eabeb27dbba5c9bdcf83d03776bffa34995666 (2019-10-30; the file last changed in 6e404a89),
Apache-2.0, with ``norm_type="batchnorm"`` (its ``ModuleHelper.BNReLU`` is
``Sequential(BatchNorm2d, ReLU)``). That repository is a training framework, not a package.
Same submodules (``stages.0.{f_key, f_query, f_value, W}``, ``conv_bn_dropout``), same operations
in the same order: query and key come from *two calls* of the shared ``f_key`` module, the pyramid
(``PSPModule``, bins 1, 3, 6, 8) pools the value and the key maps, logits are scaled by
key_channels^-1/2, and ``W`` (zero-initialised) maps back before the concat fusion.

This is benchmark code, not part of the library.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["APNB", "PSPModule"]


def _bn_relu(num_features: int) -> nn.Sequential:
    """``ModuleHelper.BNReLU(num_features, norm_type="batchnorm")``."""
    return nn.Sequential(nn.BatchNorm2d(num_features), nn.ReLU())


class PSPModule(nn.Module):
    """Adaptive average pooling at each size, flattened and concatenated: (B, C, H, W) -> (B, C, S)."""

    def __init__(self, sizes: Sequence[int] = (1, 3, 6, 8), dimension: int = 2) -> None:
        super().__init__()
        self.stages = nn.ModuleList([self._make_stage(size, dimension) for size in sizes])

    def _make_stage(self, size: int, dimension: int = 2) -> nn.Module:
        if dimension == 1:
            return nn.AdaptiveAvgPool1d(output_size=size)
        if dimension == 2:
            return nn.AdaptiveAvgPool2d(output_size=(size, size))
        return nn.AdaptiveAvgPool3d(output_size=(size, size, size))

    def forward(self, feats: Tensor) -> Tensor:
        n, c, _, _ = feats.size()
        priors = [stage(feats).view(n, c, -1) for stage in self.stages]  # (B, C, b²) each
        center = torch.cat(priors, -1)  # (B, C, S)
        return center


class _SelfAttentionBlock(nn.Module):
    """``_SelfAttentionBlock`` / ``SelfAttentionBlock2D``: the pyramid attention, then W."""

    def __init__(
        self,
        in_channels: int,
        key_channels: int,
        value_channels: int,
        out_channels: int | None = None,
        scale: int = 1,
        psp_size: Sequence[int] = (1, 3, 6, 8),
    ) -> None:
        super().__init__()
        self.scale = scale
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.key_channels = key_channels
        self.value_channels = value_channels
        if out_channels is None:
            self.out_channels = in_channels
        self.pool = nn.MaxPool2d(kernel_size=(scale, scale))
        self.f_key = nn.Sequential(
            nn.Conv2d(self.in_channels, self.key_channels, kernel_size=1, stride=1, padding=0),
            _bn_relu(self.key_channels),
        )
        self.f_query = self.f_key
        self.f_value = nn.Conv2d(
            self.in_channels, self.value_channels, kernel_size=1, stride=1, padding=0
        )
        self.W = nn.Conv2d(self.value_channels, self.out_channels, kernel_size=1, stride=1)
        self.psp = PSPModule(psp_size)
        nn.init.constant_(self.W.weight, 0)
        nn.init.constant_(self.W.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        batch_size = x.size(0)
        if self.scale > 1:
            x = self.pool(x)
        value = self.psp(self.f_value(x))  # (B, V, S)
        query = self.f_query(x).view(batch_size, self.key_channels, -1)  # (B, K, N)
        query = query.permute(0, 2, 1)  # (B, N, K)
        key = self.f_key(x)
        value = value.permute(0, 2, 1)  # (B, S, V)
        key = self.psp(key)  # (B, K, S)
        sim_map = torch.matmul(query, key)  # (B, N, S)
        sim_map = (self.key_channels**-0.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value)  # (B, N, V)
        context = context.permute(0, 2, 1).contiguous()  # (B, V, N)
        context = context.view(batch_size, self.value_channels, *x.size()[2:])  # (B, V, H, W)
        context = self.W(context)
        return context


class APNB(nn.Module):
    """``APNB(in_channels, out_channels, key_channels, value_channels, dropout, sizes=[1])``.

    Args:
        in_channels: C.
        out_channels: output channels (also W's output: the concat needs it equal to C).
        key_channels: width of queries and keys.
        value_channels: width of the values.
        dropout: Dropout2d probability after the fusion.
        sizes: one stage per entry (max-pooling factor of its input); the official networks
            use ``[1]``.
        psp_size: pyramid bins.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        key_channels: int,
        value_channels: int,
        dropout: float,
        sizes: Sequence[int] = (1,),
        psp_size: Sequence[int] = (1, 3, 6, 8),
    ) -> None:
        super().__init__()
        self.psp_size = psp_size
        self.stages = nn.ModuleList(
            [
                _SelfAttentionBlock(
                    in_channels, key_channels, value_channels, out_channels, size, psp_size
                )
                for size in sizes
            ]
        )
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, kernel_size=1, padding=0),
            _bn_relu(out_channels),
            nn.Dropout2d(dropout),
        )

    def forward(self, feats: Tensor) -> Tensor:
        priors = [stage(feats) for stage in self.stages]
        context = priors[0]
        for i in range(1, len(priors)):
            context += priors[i]
        output = self.conv_bn_dropout(torch.cat([context, feats], 1))  # (B, 2C, H, W) in
        return output
