"""The ``nonlocalnet`` command line: the only part of the package that parses arguments.

Each subcommand is a thin module of this package, imported only when it is used, which defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` and calls the library
(``engine``, ``models``, ``viz``, ``apps``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: subcommand -> module implementing it.
COMMANDS: dict[str, str] = {
    "demo": "nonlocalnet.cli.demo",
    "train": "nonlocalnet.cli.train",
    "eval": "nonlocalnet.cli.eval",
    "models": "nonlocalnet.cli.models",
    "flops": "nonlocalnet.cli.flops",
    "visualize": "nonlocalnet.cli.visualize",
    "analyze": "nonlocalnet.cli.analyze",
}

#: one line per subcommand for the top-level help (the modules are imported only when used).
SUMMARIES: dict[str, str] = {
    "demo": "the built-in long-range benchmark: C2D vs NL-C2D on generated clips",
    "train": "train a model from a YAML config (resumable, DDP under torchrun)",
    "eval": "evaluate a checkpoint (multi-view video, image top-k, segmentation mIoU)",
    "models": "list the model zoo",
    "flops": "parameters and multiply-adds of a model, per stage and per block",
    "visualize": "draw what a trained block attends to",
    "analyze": "GCNet's query-independence analysis of a trained model",
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nonlocalnet",
        description="Non-local neural networks: blocks, networks, training and analysis.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=SUMMARIES[name])
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nonlocalnet`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        # Bad input from the user: one clear line, no traceback.
        print(f"nonlocalnet {args.command}: error: {err}", file=sys.stderr)
        return 2
