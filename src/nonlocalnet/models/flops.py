"""``nonlocalnet flops``: parameters and multiply-adds of registered models.

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device (no memory,
no compute: the full 32×224×224 R101 is counted in about a second). Multiply-adds (MACs) are
FLOPs / 2, the papers' unit. Only matrix products and convolutions are counted (BN, ReLU,
pooling and softmax are not), as in the papers' tables.

Fused attention: on CPU ``scaled_dot_product_attention`` may dispatch to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch registers no formula; this
module registers one (the same as for the CUDA flash kernel: Q·Kᵀ and P·V), forward and
backward, so attention inside NL/APNB blocks is always counted.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

HELP = "parameters and multiply-adds of a registered model (total, per stage, per block)"

__all__ = ["FlopReport", "count_flops", "parse_input_size"]


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
        The report (eval mode forward, no gradients).
    """
    from nonlocalnet.models.placement import inserted_blocks

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


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"3x32x224x224"`` → ``(3, 32, 224, 224)``."""
    try:
        size = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input must look like 3x32x224x224, got {text!r}") from None
    if not size or any(s < 1 for s in size):
        raise ValueError(f"--input sizes must be positive, got {text!r}")
    return size


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocalnet flops``."""
    parser.add_argument("models", nargs="+", metavar="MODEL", help="registered model name(s)")
    parser.add_argument(
        "--input",
        default=None,
        help="input size without batch, e.g. 3x32x224x224 (default: the model's default_input)",
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model override, e.g. --set num_classes=400 --set pairwise=dot_product",
    )
    parser.add_argument(
        "--relative-to",
        default=None,
        metavar="MODEL",
        help="also print params and multiply-adds relative to this model (same input)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per model")


def _fmt(n: int, unit: float, digits: int = 2) -> str:
    return f"{n / unit:,.{digits}f}"


def _print_report(r: FlopReport) -> None:
    size = "x".join(map(str, r.input_size))
    print(
        f"{r.model} on {size}: {r.params:,} params ({r.params / 1e6:.2f}M), "
        f"{r.macs / 1e9:.2f} G multiply-adds"
    )
    print(f"  {'part':<18} {'params (M)':>12} {'MACs (G)':>12} {'% MACs':>8}")
    for part, (p, m) in r.stages.items():
        print(
            f"  {part:<18} {_fmt(p, 1e6):>12} {_fmt(m, 1e9, 3):>12} {100 * m / max(r.macs, 1):>7.1f}%"
        )
    for block, (p, m) in r.blocks.items():
        print(
            f"  {block:<18} {_fmt(p, 1e6):>12} {_fmt(m, 1e9, 3):>12} {100 * m / max(r.macs, 1):>7.1f}%"
        )


def run(args: argparse.Namespace) -> int:
    """Count and print."""
    from nonlocalnet.models.zoo import create_model

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    overrides = _parse_overrides(args.set)
    names = list(args.models)
    if args.relative_to and args.relative_to not in names:
        names.insert(0, args.relative_to)
    reports = {}
    for name in names:
        with torch.device("meta"):
            model = create_model(name, **overrides)
        size = parse_input_size(args.input) if args.input else tuple(model.default_input)
        reports[name] = count_flops(model, (args.batch, *size), name=name)
    for r in reports.values():
        if args.json:
            print(json.dumps(asdict(r)))
        else:
            _print_report(r)
            print()
    if args.relative_to and not args.json:
        base = reports[args.relative_to]
        print(f"relative to {base.model} ({'x'.join(map(str, base.input_size))}):")
        print(f"  {'model':<22} {'params (M)':>11} {'GMACs':>9} {'params x':>9} {'MACs x':>8}")
        for name, r in reports.items():
            print(
                f"  {name:<22} {r.params / 1e6:>11.2f} {r.macs / 1e9:>9.1f} "
                f"{r.params / base.params:>9.2f} {r.macs / base.macs:>8.2f}"
            )
    return 0
