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
    "convert": "nonlocalnet.cli.convert",
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
    "convert": "convert a checkpoint of another implementation (official, mm*, SlowFast, timm...)",
}


def _command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, from its module."""
    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(
        prog=f"nonlocalnet {command}", description=module.HELP, allow_abbrev=False
    )
    module.add_arguments(parser)
    # also after the command: ``nonlocalnet train -v ...`` as ``nonlocalnet -v train ...``
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(_module=module, command=command)
    return parser


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nonlocalnet",
        description="Non-local neural networks: blocks, networks, training and analysis.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sub.add_parser(name, help=SUMMARIES[name], add_help=False)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line: global options, the command, then its options and ``key=value``
    overrides in any order (``train --config C train.steps=4 --out D``).

    Raises:
        SystemExit: ``--help``, or arguments argparse refuses (with its usage message).
    """
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    top = _top_parser()
    if at is None or argv[at] not in COMMANDS:
        args = top.parse_args(argv)  # prints the help / the list of commands, or no command
        args.verbose = getattr(args, "verbose", False)
        return args
    head = top.parse_args([*argv[:at], argv[at]])
    args = _command_parser(argv[at]).parse_intermixed_args(argv[at + 1 :])
    args.verbose = head.verbose or args.verbose
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nonlocalnet`` command."""
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "command", None) is None:
        _top_parser().print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"nonlocalnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except (
        ValueError,
        TypeError,
        OSError,
        KeyError,
        RuntimeError,
        ArithmeticError,  # FloatingPointError: a loss that is not finite
        ImportError,  # an optional dependency (an extra) that is not installed
    ) as err:
        # Bad input, a diverged or a stopped run: one clear line (the traceback with --verbose).
        if args.verbose:
            raise
        print(f"nonlocalnet {args.command}: error: {err}", file=sys.stderr)
        return 2
