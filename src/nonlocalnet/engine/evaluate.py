"""Evaluation of a model or a checkpoint on the validation set of a config.

Video: top-1/top-5 with the multi-view protocol (each sample holds ``num_clips x num_crops``
views, clip-major / crop-minor; softmax per view, averaged per video). Images: top-1/top-5 of one
view. Segmentation: mean IoU and per-class IoU from a confusion matrix that skips
``data.ignore_index``. Detection: COCO box AP (and mask AP for Mask R-CNN) with pycocotools'
COCOeval (:mod:`nonlocalnet.engine.coco_eval`): AP at IoU 0.50:0.95, AP50, AP75, AP
small/medium/large and the ARs, as ``bbox_AP``, ``bbox_AP50``, ..., ``segm_AP``, ... in percent
(-1 where the ground truth has no object of that size, COCO's convention); the summarize()
tables and the AP table are logged. Under torchrun each process evaluates a shard; scores are
gathered by sample index (padded duplicates merged), confusion matrices summed, and COCO results
gathered by image id.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from nonlocalnet.data.samples import SkipTracker
from nonlocalnet.engine import checkpoint as ckpt
from nonlocalnet.engine.build import build_datasets, build_model, collate_for
from nonlocalnet.engine.config import Config, apply_overrides, config_from_dict, config_to_dict
from nonlocalnet.engine.distributed import DistInfo, init_distributed
from nonlocalnet.engine.metrics import ConfusionMatrix, ScoreAccumulator, multiview_scores
from nonlocalnet.engine.sampling import EvalBatchSampler
from nonlocalnet.engine.step import (
    autocast_context,
    model_output,
    resolve_device,
    skip_totals,
    split_batch,
)

__all__ = ["evaluate", "finite_metrics", "run_evaluation", "stored_config"]

logger = logging.getLogger(__name__)


def _logits(output: Any) -> torch.Tensor:
    return model_output(output)[0]


@torch.no_grad()
def run_evaluation(
    model: nn.Module,
    dataset: Dataset,
    config: Config,
    *,
    dist_info: DistInfo | None = None,
    device: torch.device | str = "cpu",
    predictions: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` with the protocol of ``config.data.task``.

    Args:
        model: the model.
        dataset: the validation dataset (test views).
        config: the run config (``data``, ``eval`` and ``train.amp`` are used).
        dist_info: this process's rank (each process evaluates a shard).
        device: where the model runs.
        predictions: also return each sample's prediction (video/image).

    Returns:
        video/image: ``top1``, ``top5`` (percent; top-k with k > classes left out),
        ``num_samples``; segmentation: ``mean_iou``, ``per_class_iou``, ``pixel_accuracy``
        (percent), ``num_pixels``; detection: ``bbox_AP``, ``bbox_AP50``, ... (``segm_*`` for
        Mask R-CNN; percent), ``num_images``; always ``skipped``, the unreadable samples left
        out. With ``predictions``: ``predictions``, one ``{"index", "path", "label",
        "prediction", "scores"}`` per sample (scores averaged over its views), in index order;
        detection: the COCO results per IoU type (``{"bbox": [...], "segm": [...]}``).

    Raises:
        RuntimeError: more than ``data.max_skip_fraction`` of the samples were unreadable.
    """
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
    if task == "detection":
        try:
            return _detection_metrics(
                model, dataset, loader, dist_info, device, autocast, config, predictions
            )
        finally:
            model.train(was_training)
    scores = ScoreAccumulator()
    confusion = ConfusionMatrix(config.data.num_classes, config.data.ignore_index)
    skips = SkipTracker(config.data.max_skip_fraction, num_entries=len(dataset))
    paths: dict[int, str] = {}
    for number, (batch_indices, batch) in enumerate(zip(sampler, loader, strict=True)):
        skips.update(batch, check=False)
        inputs, target = split_batch(batch, task)
        # Samples are identified by their dataset index (unreadable ones are dropped from a batch).
        indices = batch.get("index")
        if not isinstance(indices, torch.Tensor) or len(indices) != len(target):
            indices = None if len(target) != len(batch_indices) else torch.as_tensor(batch_indices)
        if task == "segmentation":
            # The confusion matrix sums over samples: the shard's padded repeats stay out.
            rows = _rows_without_padding(indices, len(target), batch_indices, sampler, number)
            inputs, target = inputs[:rows], target[:rows]
        if len(target) == 0:  # every sample of the batch was unreadable (or padding)
            continue
        if indices is None:
            indices = torch.as_tensor(batch_indices[: len(target)])
        inputs, target = inputs.to(device), target.to(device)
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
        if predictions:
            paths.update(zip(indices.tolist(), batch.get("path") or [], strict=False))
    model.train(was_training)
    skipped, read = skip_totals(skips)
    if task == "segmentation":
        out = confusion.compute(device)
    else:
        out = scores.compute(tuple(config.eval.topk), device)
    out["skipped"] = skipped
    skips.check_total(skipped, read)
    if predictions and task != "segmentation":
        out["predictions"] = _predictions(scores, paths, device)
    return out


def _rows_without_padding(
    indices: torch.Tensor | None,
    rows: int,
    batch_indices: list[int],
    sampler: EvalBatchSampler,
    number: int,
) -> int:
    """How many leading rows of batch ``number`` are real samples: the padded repeats are the
    last indices of a shard, and a batch keeps its order when unreadable samples are dropped
    (a padded sample that was dropped is no row; with the rows' dataset ``indices`` unknown,
    every padded sample is taken to be a row)."""
    real = sampler.real_count(number)
    pads = batch_indices[real:]
    if not pads:
        return rows
    if rows == len(batch_indices):
        return real
    if indices is None:
        return max(rows - len(pads), 0)
    keep = rows
    for pad in reversed(pads):
        if keep and int(indices[keep - 1]) == pad:
            keep -= 1
    return keep


def _detection_metrics(
    model: nn.Module,
    dataset: Dataset,
    loader: DataLoader,
    dist_info: DistInfo,
    device: torch.device,
    autocast: Any,
    config: Config,
    predictions: bool,
) -> dict[str, Any]:
    """COCOeval of a detector over ``loader`` (see :func:`run_evaluation`)."""
    from nonlocalnet.engine.coco_eval import COCOEvaluator, collect_detections

    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    ground_truth = getattr(base, "coco", None)
    if not callable(ground_truth):
        raise TypeError(
            f"detection evaluation needs a COCO-format dataset with coco() (COCODetection), got "
            f"{type(base).__name__}"
        )
    roi_heads = getattr(model, "roi_heads", None)
    has_masks = bool(roi_heads is not None and roi_heads.has_mask())
    evaluator = COCOEvaluator(
        ground_truth(),
        ("bbox", "segm") if has_masks else ("bbox",),
        label_to_category=getattr(base, "label_to_category", None),
    )
    skips = SkipTracker(config.data.max_skip_fraction, num_entries=len(dataset))
    collect_detections(
        model,
        loader,
        evaluator,
        device=device,
        autocast=autocast,
        on_batch=lambda batch: skips.update(batch, check=False),
    )
    skipped, read = skip_totals(skips)
    skips.check_total(skipped, read)
    if len(evaluator) == 0:
        raise RuntimeError("detection evaluation: no image of the validation set could be read")
    metrics = evaluator.evaluate(log_tables=dist_info.is_main)
    out: dict[str, Any] = {}
    for iou_type in evaluator.iou_types:
        for name, value in metrics[iou_type].items():
            out[f"{iou_type}_{name}"] = 100.0 * value if value >= 0 else value
    out["num_images"] = metrics["num_images"]
    out["skipped"] = skipped
    if predictions:
        out["predictions"] = evaluator.results()
    return out


def _predictions(
    scores: ScoreAccumulator, paths: dict[int, str], device: torch.device
) -> list[dict[str, Any]]:
    """One record per sample (gathered over processes), in index order."""
    index, score, label = scores.gather(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shards: list[dict[int, str]] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(shards, paths)
        paths = {k: v for shard in shards for k, v in shard.items()}
    return [
        {
            "index": int(i),
            "path": paths.get(int(i)),
            "label": int(y),
            "prediction": int(row.argmax()),
            "scores": [round(float(v), 6) for v in row],
        }
        for i, row, y in zip(index, score, label, strict=True)
    ]


def evaluate(
    config: Config, checkpoint: str | Path, *, predictions: bool = False
) -> dict[str, Any]:
    """Load ``checkpoint``'s weights into ``config``'s model and evaluate on the validation set.

    Args:
        config: run config (model, data, eval sections are used).
        checkpoint: a training checkpoint (``.pt``, read with ``weights_only=True``), a run dir
            (its latest checkpoint) or a ``.safetensors`` file.

    Returns:
        The metrics of :func:`run_evaluation`.
    """
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
        state, stored = ckpt.load_weights(path), None
    else:
        saved = ckpt.load_checkpoint(path)
        state, stored = saved["model"], saved.get("config")
    ckpt.check_state_dict(
        model, state, source=f"checkpoint {str(path)!r}", stored_config=stored,
        config=config_to_dict(config),
    )  # fmt: skip
    model.load_state_dict(state)
    model.to(device)
    _, val_set = build_datasets(config, train=False)
    metrics = run_evaluation(
        model, val_set, config, dist_info=dist_info, device=device, predictions=predictions
    )
    shown = {k: v for k, v in finite_metrics(metrics).items() if k != "predictions"}
    logger.info("eval %s: %s", path, json.dumps(shown))
    return metrics


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (NaN -> None)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in metrics.items()}


def stored_config(checkpoint: str, overrides: list[str]) -> Config:
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
