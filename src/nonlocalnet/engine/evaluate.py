"""``nonlocalnet eval``: evaluate a checkpoint on the validation set of a config.

Video: top-1/top-5 with the multi-view protocol (each sample holds ``num_clips x num_crops``
views, clip-major / crop-minor; softmax per view, averaged per video). Images: top-1/top-5 of one
view. Segmentation: mean IoU and per-class IoU from a confusion matrix that skips
``data.ignore_index``. Under torchrun each process evaluates a shard; scores are gathered by
sample index (padded duplicates merged) and confusion matrices summed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from nonlocalnet.engine import checkpoint as ckpt
from nonlocalnet.engine.build import build_datasets, build_model, collate_for
from nonlocalnet.engine.config import Config, apply_overrides, config_from_dict, load_config
from nonlocalnet.engine.distributed import DistInfo, init_distributed
from nonlocalnet.engine.metrics import ConfusionMatrix, ScoreAccumulator, multiview_scores
from nonlocalnet.engine.sampling import EvalBatchSampler

__all__ = ["HELP", "add_arguments", "evaluate", "run", "run_evaluation"]

logger = logging.getLogger(__name__)

HELP = "evaluate a checkpoint: video/image top-1/top-5 (multi-view), segmentation mIoU"


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


@torch.no_grad()
def run_evaluation(
    model: nn.Module,
    dataset: Dataset,
    config: Config,
    *,
    dist_info: DistInfo | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` with the protocol of ``config.data.task``.

    Returns:
        video/image: ``top1``, ``top5`` (percent; top-k with k > classes left out),
        ``num_samples``; segmentation: ``mean_iou``, ``per_class_iou``, ``pixel_accuracy``
        (percent), ``num_pixels``. Skipped (unreadable) samples are counted in ``skipped``.
    """
    from nonlocalnet.engine.train import autocast_context, count_skipped, split_batch

    dist_info = dist_info or DistInfo()
    device = torch.device(device)
    task = config.data.task
    was_training = model.training
    model.eval()
    if config.eval.max_samples > 0 and len(dataset) > config.eval.max_samples:
        dataset = Subset(dataset, range(config.eval.max_samples))
    sampler = EvalBatchSampler(
        len(dataset), config.eval.batch_size, rank=dist_info.rank, world_size=dist_info.world_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate_for(config),
    )
    autocast = autocast_context(config.train.amp, device)
    scores = ScoreAccumulator()
    confusion = ConfusionMatrix(config.data.num_classes, config.data.ignore_index)
    skipped = 0
    for batch_indices, batch in zip(sampler, loader, strict=True):
        skipped += count_skipped(batch)
        inputs, target = split_batch(batch, task)
        if len(target) == 0:  # every video of the batch was unreadable
            continue
        inputs, target = inputs.to(device), target.to(device)
        # Samples are identified by their dataset index (unreadable ones are dropped from a batch).
        indices = batch.get("index")
        if not isinstance(indices, torch.Tensor) or len(indices) != len(target):
            indices = torch.as_tensor(batch_indices)
        if task == "segmentation":
            with autocast:
                logits = _logits(model(inputs))
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(
                    logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
                )
            confusion.update(logits.argmax(dim=1), target)
            continue
        if task == "video" and inputs.dim() == 6:
            v = inputs.shape[1]
            with autocast:
                logits = _logits(model(inputs.flatten(0, 1)))  # (B*V, C, T, H, W)
            batch_scores = multiview_scores(logits, v)  # (B, K)
        else:
            with autocast:
                logits = _logits(model(inputs))
            batch_scores = logits.float().softmax(dim=-1)  # (B, K)
        scores.update(indices, batch_scores, target)
    model.train(was_training)
    if task == "segmentation":
        out = confusion.compute(device)
    else:
        out = scores.compute(tuple(config.eval.topk), device)
    if skipped:
        out["skipped"] = skipped
    return out


def evaluate(config: Config, checkpoint: str | Path) -> dict[str, Any]:
    """Load ``checkpoint``'s weights into ``config``'s model and evaluate on the validation set.

    Args:
        config: run config (model, data, eval sections are used).
        checkpoint: a training checkpoint (``.pt``, read with ``weights_only=True``), a run dir
            (its latest checkpoint) or a ``.safetensors`` file.

    Returns:
        The metrics of :func:`run_evaluation`.
    """
    from nonlocalnet.engine.train import resolve_device

    dist_info = init_distributed()
    device = resolve_device(config.train.device, dist_info)
    path = Path(checkpoint)
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint_<step>.pt in {str(path)!r}")
        path = found
    model = build_model(config)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} not found")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)))
    else:
        model.load_state_dict(ckpt.load_checkpoint(path)["model"])
    model.to(device)
    _, val_set = build_datasets(config, train=False)
    metrics = run_evaluation(model, val_set, config, dist_info=dist_info, device=device)
    logger.info("eval %s: %s", path, json.dumps(_finite(metrics)))
    return metrics


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (NaN -> None)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in metrics.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def _stored_config(checkpoint: str, overrides: list[str]) -> Config:
    """The resolved config saved in a checkpoint (or its run dir), with overrides applied."""
    path = Path(checkpoint)
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint_<step>.pt in {str(path)!r}")
        path = found
    if path.suffix == ".safetensors":
        raise ValueError("--config is needed with a .safetensors file (it stores no config)")
    stored = ckpt.load_checkpoint(path).get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"checkpoint {str(path)!r} stores no config; pass --config")
    return config_from_dict(apply_overrides(stored, overrides))


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        config = _stored_config(args.checkpoint, args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    metrics = _finite(evaluate(config, args.checkpoint))
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
    from nonlocalnet.engine.distributed import cleanup_distributed

    cleanup_distributed()
    return 0
