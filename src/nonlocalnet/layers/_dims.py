"""The per-dimension layer tables and the constructor checks every block shares.

One block implementation serves 1d ``(B, C, L)``, 2d ``(B, C, H, W)`` and 3d ``(B, C, T, H, W)``
inputs: it takes ``dims`` and picks its convolution, norm, pooling and dropout here, so that the
parameters keep the layout of the papers' and peers' checkpoints (1×1, 1×1×1 convolutions).

This module depends on torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet._checks import check_choice

__all__ = [
    "ADAPTIVE_AVG_POOL",
    "BATCH_NORM",
    "CONV",
    "DIMS",
    "DROPOUT",
    "MAX_POOL",
    "check_batch_norm_values",
    "check_dims",
    "check_dropout",
    "check_positive_int",
    "parameter_placement",
]

#: the ``dims`` every block accepts: dimensions after (B, C).
DIMS = (1, 2, 3)

CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DROPOUT: dict[int, type[nn.Module]] = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def check_dims(dims: object, owner: str | None = None) -> None:
    """Raise ``ValueError`` unless ``dims`` is 1, 2 or 3 (``owner`` prefixes the message)."""
    check_choice("dims", dims, DIMS, owner=owner)


def check_positive_int(owner: str, name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ≥ 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_dropout(owner: str, p: object) -> None:
    """Raise ``ValueError`` unless ``p`` is a probability in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1), got {p!r}")


def parameter_placement(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """``(dtype, device)`` of a block's first floating parameter, which its input must share.

    ``(None, None)`` for a block without parameters.
    """
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return None, None


def check_batch_norm_values(block: nn.Module, x: torch.Tensor, owner: str) -> None:
    """Raise ``ValueError`` if a norm of ``block`` would see a single value to normalise.

    A BatchNorm in training mode needs more than one value per channel (batch × positions > 1),
    a GroupNorm more than one value per group (a norm given as a callable may be one).
    """
    per_channel = x.numel() // x.shape[1]
    if per_channel > 1:
        return
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"{owner}: a BatchNorm in training mode needs more than one value per channel, "
                f"got input shape {tuple(x.shape)} (batch × positions = 1); call block.eval() "
                f"or give a larger input"
            )
        if isinstance(m, nn.GroupNorm) and m.num_channels // m.num_groups < 2:
            raise ValueError(
                f"{owner}: its GroupNorm({m.num_groups}, {m.num_channels}) needs more than one "
                f"value per group, got input shape {tuple(x.shape)}; give a larger input"
            )
