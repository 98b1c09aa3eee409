"""``nonlocalnet models``: list the registered models, their task, size and description."""

from __future__ import annotations

import argparse

HELP = "list the registered models (name, task, default input, description)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocalnet models``."""
    parser.add_argument("pattern", nargs="?", default="*", help="glob on names, e.g. 'nl_*'")
    parser.add_argument(
        "--task", choices=("image", "video", "segmentation"), default=None, help="only this task"
    )
    parser.add_argument(
        "--params", action="store_true", help="also count parameters (builds each model on meta)"
    )
    parser.add_argument("--doc", action="store_true", help="print the full description")


def run(args: argparse.Namespace) -> int:
    """Print one line per model (and its description with --doc)."""
    import torch

    from nonlocalnet.models.zoo import list_models, model_info

    names = list_models(args.pattern, task=args.task)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}")
    for name in names:
        info = model_info(name)
        first = " ".join(info.doc.split())
        size = "x".join(map(str, info.defaults.get("default_input", ())))
        if args.params:
            with torch.device("meta"):
                model = info.build()
            size = "x".join(map(str, model.default_input))
            count = f"{sum(p.numel() for p in model.parameters()) / 1e6:8.2f}M "
        else:
            count = ""
        summary = first if args.doc else first.split(". ")[0][:90]
        print(f"{name:<22} {info.task:<13} {count}{size:<14} {summary}")
    return 0
