"""``nonlocalnet eval``: evaluate a checkpoint on the validation set of a config."""

from __future__ import annotations

import argparse
import csv
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
    parser.add_argument(
        "--json",
        default=None,
        help="also write the metrics and each sample's prediction to this JSON file",
    )
    parser.add_argument(
        "--csv",
        default=None,
        help="write each sample's prediction (index, path, label, prediction, scores) as CSV",
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line per metric."""
    from nonlocalnet.engine.config import load_config
    from nonlocalnet.engine.distributed import cleanup_distributed
    from nonlocalnet.engine.evaluate import evaluate, finite_metrics, stored_config

    if args.config is None:
        config = stored_config(args.checkpoint, args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        print(f"test views: {_views(config)}")
    wanted = bool(args.json or args.csv)
    metrics = finite_metrics(evaluate(config, args.checkpoint, predictions=wanted))
    if main:
        predictions = metrics.pop("predictions", [])
        if args.json:
            record = {**metrics, "views": _views(config), "predictions": predictions}
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        if args.csv:
            if config.data.task == "detection":
                _write_detections_csv(Path(args.csv), predictions)
            else:
                _write_csv(Path(args.csv), predictions)
        per_class = metrics.pop("per_class_iou", None)
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {shown}")
        if per_class is not None:
            print("per-class IoU: " + " ".join("-" if v is None else f"{v:.1f}" for v in per_class))
    cleanup_distributed()
    return 0


def _views(config: object) -> str:
    """The test protocol, in words."""
    data, ev = config.data, config.eval  # type: ignore[attr-defined]
    if data.task == "video":
        return (
            f"{ev.num_clips} clips x {ev.num_crops} crops of {data.test_crop} per video "
            f"(short side {data.test_short_side}), softmax averaged over the "
            f"{ev.num_clips * ev.num_crops} views"
        )
    if data.task == "image":
        return f"one centre crop of {data.test_crop} (short side {data.test_short_side})"
    if data.task == "detection":
        return "the whole image, resized by the detector (its min_size / max_size), one view"
    return "the whole image, one view"


def _write_csv(path: Path, predictions: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "label", "prediction", "scores"])
        for p in predictions:
            scores = " ".join(f"{v:.6g}" for v in p["scores"])
            writer.writerow([p["index"], p["path"], p["label"], p["prediction"], scores])


def _write_detections_csv(path: Path, predictions: dict) -> None:
    """The detections (COCO results: one row per box) as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "category_id", "score", "x", "y", "width", "height"])
        for r in predictions.get("bbox", []) if isinstance(predictions, dict) else []:
            x, y, w, h = r["bbox"]
            writer.writerow([r["image_id"], r["category_id"], f"{r['score']:.6g}", x, y, w, h])
