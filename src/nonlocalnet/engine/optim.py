"""SGD with parameter groups: no weight decay on normalisation parameters and biases."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_optimizer", "param_groups"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(
    model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False
) -> list[dict]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    BatchNorm/GroupNorm/LayerNorm weights and every bias go to the group with
    ``weight_decay=0`` (the NL paper's recipe: "no weight decay on BN"), unless
    ``decay_norm_and_bias``.

    Returns:
        ``[{"params": decayed, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}]``,
        each list in ``model.named_parameters()`` order; empty groups are dropped.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = isinstance(module, _NORMS) or name == "bias" or param.ndim <= 1
            (no_decay if exempt and not decay_norm_and_bias else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    decay_norm_and_bias: bool = False,
) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups`."""
    groups = param_groups(model, weight_decay, decay_norm_and_bias=decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
