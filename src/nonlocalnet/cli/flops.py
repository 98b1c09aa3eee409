"""``nonlocalnet flops``: parameters and multiply-adds of registered models.

Counts come from :func:`nonlocalnet.models.flops.count_flops` on the meta device: a table per
model (stem, res2..res5, head, and every inserted block), optionally ratios to a reference
model (the NL paper's Table 2e is relative to C2D R101). Detectors take ``--input 3x800x1333``
(their default: one COCO image, resized and padded as the detector does) and add the FPN, RPN,
box and mask heads (at 1000 proposals and 100 detections); GCNet's Table 1 compares them with
``--relative-to maskrcnn_r50_fpn``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from nonlocalnet.cli._args import parse_key_values
from nonlocalnet.models import create_model
from nonlocalnet.models.flops import FlopReport, count_flops

HELP = "parameters and multiply-adds of a registered model (total, per stage, per block)"


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"3x32x224x224"`` → ``(3, 32, 224, 224)``."""
    try:
        size = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input must look like 3x32x224x224, got {text!r}") from None
    if not size or any(s < 1 for s in size):
        raise ValueError(f"--input sizes must be positive, got {text!r}")
    return size


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
    rows = [*r.stages.items(), *r.blocks.items()]
    width = max([18, *(len(part) for part, _ in rows)])
    print(f"  {'part':<{width}} {'params (M)':>12} {'MACs (G)':>12} {'% MACs':>8}")
    for part, (p, m) in rows:
        share = 100 * m / max(r.macs, 1)
        print(f"  {part:<{width}} {_fmt(p, 1e6):>12} {_fmt(m, 1e9, 3):>12} {share:>7.1f}%")


def run(args: argparse.Namespace) -> int:
    """Count and print."""
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    overrides = parse_key_values(args.set)
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
        width = max([22, *(len(name) for name in reports)])
        print(f"  {'model':<{width}} {'params (M)':>11} {'GMACs':>9} {'params x':>9} {'MACs x':>8}")
        for name, r in reports.items():
            print(
                f"  {name:<{width}} {r.params / 1e6:>11.2f} {r.macs / 1e9:>9.1f} "
                f"{r.params / base.params:>9.2f} {r.macs / base.macs:>8.2f}"
            )
    return 0
