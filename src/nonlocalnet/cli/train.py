"""``nonlocalnet train``: train a model from a YAML config (single process, or DDP under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

HELP = "train a model from a YAML config (single process, or DDP under torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet train``."""
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.1"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint",
    )
    parser.add_argument(
        "--resume-from",
        default=None,
        metavar="CHECKPOINT",
        help="continue from this checkpoint (or this folder's latest), writing into --out",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="clear --out first (a new run refuses a folder holding another run)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="run folder (default: train.out_dir; relative paths are to the current directory)",
    )
    parser.add_argument(
        "--export-safetensors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write model.safetensors at the end (default: train.export_safetensors)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the config, train, print the final metrics as one JSON line.

    On SIGINT/SIGTERM the run stops after its current step with a checkpoint; this prints how
    to continue and returns 128 + the signal's number.
    """
    from nonlocalnet.engine.config import load_config
    from nonlocalnet.engine.distributed import cleanup_distributed
    from nonlocalnet.engine.train import TrainingStopped, train

    config = load_config(args.config, args.overrides)
    out = args.out if args.out is not None else config.train.out_dir
    try:
        result = train(
            config,
            resume=args.resume,
            resume_from=args.resume_from,
            out_dir=out,
            overwrite=args.overwrite,
            export_safetensors=args.export_safetensors,
        )
    except TrainingStopped as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            again = ["nonlocalnet", "train", "--config", args.config, "--out", str(out)]
            again += [*args.overrides, "--resume"]
            print(
                f"stopped at step {stop.step}; continue with: {shlex.join(again)}", file=sys.stderr
            )
        cleanup_distributed()
        return stop.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    cleanup_distributed()
    return 0
