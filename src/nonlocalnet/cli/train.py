"""``nonlocalnet train``: train a model from a YAML config (single process, or DDP under torchrun)."""

from __future__ import annotations

import argparse
import json
import os

HELP = "train a model from a YAML config (single process, or DDP under torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet train``."""
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.1"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint of the run dir (or from CHECKPOINT)",
    )
    parser.add_argument("--out", default=None, help="run dir (default: train.out_dir)")
    parser.add_argument(
        "--export-safetensors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write model.safetensors at the end (default: train.export_safetensors)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the config, train, print the final metrics as one JSON line."""
    from nonlocalnet.engine.config import load_config
    from nonlocalnet.engine.distributed import cleanup_distributed
    from nonlocalnet.engine.train import train

    config = load_config(args.config, args.overrides)
    result = train(
        config, resume=args.resume, out_dir=args.out, export_safetensors=args.export_safetensors
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    cleanup_distributed()
    return 0
