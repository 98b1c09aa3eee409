"""``nonlocalnet eval``: evaluate a checkpoint on the validation set of a config."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP = "evaluate a checkpoint: video/image top-1/top-5 (multi-view), segmentation mIoU"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet eval``."""
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config file (default: the config stored in the checkpoint)",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint .pt, run dir, or .safetensors weights"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.num_clips=3"
    )
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line per metric."""
    from nonlocalnet.engine.config import load_config
    from nonlocalnet.engine.distributed import cleanup_distributed
    from nonlocalnet.engine.evaluate import evaluate, finite_metrics, stored_config

    if args.config is None:
        config = stored_config(args.checkpoint, args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    metrics = finite_metrics(evaluate(config, args.checkpoint))
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
        per_class = metrics.pop("per_class_iou", None)
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {shown}")
        if per_class is not None:
            print("per-class IoU: " + " ".join("-" if v is None else f"{v:.1f}" for v in per_class))
    cleanup_distributed()
    return 0
