"""``nonlocalnet models``: the registered models, their task, default input and description."""

from __future__ import annotations

import argparse
import shutil
import textwrap

import torch

from nonlocalnet.models.zoo import TASKS, ModelInfo, list_models, model_info

HELP = "list the registered models (name, task, default input, description)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocalnet models``."""
    parser.add_argument("pattern", nargs="?", default="*", help="glob on names, e.g. 'nl_*'")
    parser.add_argument("--task", choices=TASKS, default=None, help="only this task")
    parser.add_argument(
        "--params", action="store_true", help="also count parameters (builds each model on meta)"
    )
    parser.add_argument(
        "--doc", action="store_true", help="print the full description and the block options"
    )


def _size(size: tuple[int, ...] | None) -> str:
    return "x".join(map(str, size)) if size else "-"


def _row(info: ModelInfo, params: bool) -> dict[str, str]:
    """The cells of one model: the default input from the registration, or from the model
    built on the meta device when the registration does not say (or ``params`` is asked)."""
    size = info.default_input()
    count = ""
    if params or size is None:
        with torch.device("meta"):
            model = info.build()
        size = getattr(model, "default_input", size)
        count = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    return {"name": info.name, "task": info.task, "params": count, "input": _size(size)}


def _print_doc(info: ModelInfo, width: int) -> None:
    indent = " " * 4
    for paragraph in info.doc.split("\n\n")[1:]:
        print(
            textwrap.fill(
                " ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent
            )
        )
    if info.shortcuts:
        options = f"block options (into {info.block_key}): {', '.join(info.shortcuts)}"
        print(textwrap.fill(options, width, initial_indent=indent, subsequent_indent=indent * 2))
    builder = getattr(info.builder, "__name__", type(info.builder).__name__)
    print(f"{indent}other overrides: the keywords of {builder}")


def run(args: argparse.Namespace) -> int:
    """Print a header and one line per model (and its full description with --doc)."""
    names = list_models(args.pattern, task=args.task)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}")
    infos = [model_info(n) for n in names]
    rows = [_row(info, args.params) for info in infos]
    columns = ["name", "task", *(["params"] if args.params else []), "input"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lead = sum(widths.values()) + 2 * len(columns)
    total = shutil.get_terminal_size((120, 24)).columns
    desc_width = max(40, total - lead)

    def line(cells: dict[str, str], description: str) -> str:
        return "  ".join(cells[c].ljust(widths[c]) for c in columns) + "  " + description

    print(line({c: c for c in columns}, "description").rstrip())
    for info, row in zip(infos, rows, strict=True):
        summary = (
            info.summary
            if args.doc
            else textwrap.shorten(
                info.summary, desc_width, placeholder=" …", break_on_hyphens=False
            )
        )
        print(line(row, summary).rstrip())
        if args.doc:
            _print_doc(info, total)
    return 0
