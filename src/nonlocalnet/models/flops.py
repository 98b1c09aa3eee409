"""Parameters and multiply-adds of networks and blocks.

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode`, best on the meta device (no
memory, no compute: the full 32×224×224 R101 is counted in about a second). Multiply-adds
(MACs) are FLOPs / 2, the papers' unit. Only matrix products and convolutions are counted (BN,
ReLU, pooling and softmax are not), as in the papers' tables.

Fused attention: on CPU ``scaled_dot_product_attention`` may dispatch to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch registers no formula; this
module registers one (the same as for the CUDA flash kernel: Q·Kᵀ and P·V), forward and
backward, so attention inside NL/APNB blocks is always counted by :func:`count_macs` and
:func:`count_flops`.

The ``nonlocalnet flops`` command (:mod:`nonlocalnet.cli.flops`) prints these counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from nonlocalnet.models.placement import inserted_blocks

__all__ = ["FlopReport", "count_flops", "count_macs"]


def _register_fused_attention_formulas() -> None:
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(fwd)
        def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kw):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(bwd)
        def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kw):
            return flop_counter.sdpa_backward_flop_count(
                grad_out_shape, query_shape, key_shape, value_shape
            )


_register_fused_attention_formulas()


def count_macs(fn: Callable[..., Any], *inputs: Any) -> int:
    """Multiply-adds of calling ``fn(*inputs)``.

    Everything the call runs is counted: a forward pass, or a whole training step when ``fn``
    also calls ``backward()``. The call runs as is (the caller chooses train/eval mode, gradients
    and device; meta tensors count without computing).

    Args:
        fn: a module or any callable.
        *inputs: its positional arguments.

    Returns:
        Matrix-product and convolution multiply-adds (FLOPs / 2), fused attention included.
    """
    if not callable(fn):
        raise TypeError(f"count_macs: fn must be a module or a callable, got {type(fn).__name__}")
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() // 2


@dataclass
class FlopReport:
    """Counts of one model on one input.

    Attributes:
        model: model name.
        input_size: input shape including the batch.
        params: parameter count.
        macs: multiply-adds of one forward pass.
        stages: part name (``stem``, ``res2``..``res5``, ``head``, ...) → ``(params, macs)``;
            stage counts include blocks inserted in the stage.
        blocks: inserted block name (``layer3.1.after``, ``layer2.0.gc``) → ``(params, macs)``.
    """

    model: str
    input_size: tuple[int, ...]
    params: int
    macs: int
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_PARTS = {
    "stem": ("conv1", "bn1"),
    "res2": ("layer1",),
    "res3": ("layer2",),
    "res4": ("layer3",),
    "res5": ("layer4",),
    "head": ("fc",),
}


def _parts(model: nn.Module) -> dict[str, list[str]]:
    """Part name → submodule names (for ResNets and segmentation models)."""
    prefix = "backbone." if hasattr(model, "backbone") else ""
    parts = {k: [prefix + n for n in v] for k, v in _PARTS.items()}
    if prefix:
        parts.pop("head")
        parts["head"] = ["head"]
        parts["aux_head"] = ["aux_head"]
    named = dict(model.named_modules())
    return {k: [n for n in v if n in named] for k, v in parts.items() if any(n in named for n in v)}


def count_flops(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    name: str | None = None,
    device: str | torch.device = "meta",
) -> FlopReport:
    """Count parameters and multiply-adds of ``model`` on an input of ``input_size``.

    Args:
        model: the network (on ``device``; build it under ``torch.device("meta")`` to count
            without memory).
        input_size: full input shape, batch first.
        name: model name for the report.
        device: where the input is created.

    Returns:
        The report of one forward pass in eval mode without gradients, per stage and per
        inserted block.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(tuple(input_size), device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def macs_of(fqn: str) -> int:
        return counts.get(f"{root}.{fqn}", 0) // 2

    named = dict(model.named_modules())
    stages = {
        part: (sum(_params(named[n]) for n in names), sum(macs_of(n) for n in names))
        for part, names in _parts(model).items()
    }
    blocks = {n: (_params(b), macs_of(n)) for n, b in inserted_blocks(model).items()}
    return FlopReport(
        model=name or getattr(model, "model_name", type(model).__name__),
        input_size=tuple(int(s) for s in input_size),
        params=_params(model),
        macs=counter.get_total_flops() // 2,
        stages=stages,
        blocks=blocks,
    )
