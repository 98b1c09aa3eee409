"""Evaluation metrics: multi-view video scores, top-k accuracy, confusion-matrix IoU.

Accuracies are returned in percent. The multi-view protocol (NL paper, SlowFast, mmaction2):
each video gives ``num_clips x num_crops`` views, ordered clip-major / crop-minor; the softmax of
each view's logits is averaged over the views of the video, and the averaged scores are ranked.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nonlocalnet.engine.distributed import all_gather_tensor, all_reduce_sum

__all__ = [
    "ConfusionMatrix",
    "ScoreAccumulator",
    "iou_from_confusion",
    "multiview_scores",
    "topk_accuracy",
]


def multiview_scores(logits: torch.Tensor, num_views: int) -> torch.Tensor:
    """Average the per-view softmax scores of each video.

    Args:
        logits: ``(B * V, K)`` logits, the ``V = num_views`` views of a video consecutive.
        num_views: views per video.

    Returns:
        ``(B, K)`` averaged class probabilities.
    """
    if logits.dim() != 2 or logits.shape[0] % num_views:
        raise ValueError(
            f"multiview_scores: expected (B * {num_views}, K) logits, got shape {tuple(logits.shape)}"
        )
    probs = logits.float().softmax(dim=-1)
    return probs.view(-1, num_views, probs.shape[-1]).mean(dim=1)  # (B, V, K) -> (B, K)


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: list[int] | tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent (torchmetrics ``multiclass_accuracy``, micro average).

    Values of k larger than the number of classes are left out.
    """
    from torchmetrics.functional.classification import multiclass_accuracy

    num_classes = scores.shape[-1]
    out = {}
    for k in ks:
        if k > num_classes:
            continue
        acc = multiclass_accuracy(scores, labels, num_classes=num_classes, top_k=k, average="micro")
        out[f"top{k}"] = 100.0 * float(acc)
    return out


class ScoreAccumulator:
    """Collects per-sample scores with their dataset index; gathers across processes.

    Duplicated indices (the padding of the distributed eval sampler, or a video split over
    several items) are merged by averaging their scores.
    """

    def __init__(self) -> None:
        self.indices: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, indices: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.indices.append(indices.detach().long().cpu())
        self.scores.append(scores.detach().float().cpu())
        self.labels.append(labels.detach().long().cpu())

    def gather(
        self, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices, scores, labels)`` over all processes, one row per unique index, sorted."""
        if self.indices:
            idx = torch.cat(self.indices)
            sc = torch.cat(self.scores)
            lb = torch.cat(self.labels)
        else:
            idx, sc, lb = torch.zeros(0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0).long()
        idx = all_gather_tensor(idx.to(device)).cpu()
        sc = all_gather_tensor(sc.to(device)).cpu()
        lb = all_gather_tensor(lb.to(device)).cpu()
        unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        summed = torch.zeros(len(unique), sc.shape[-1]).index_add_(0, inverse, sc)
        counts = torch.zeros(len(unique)).index_add_(0, inverse, torch.ones(len(idx)))
        labels = torch.zeros(len(unique), dtype=torch.long).scatter_(0, inverse, lb)
        return unique, summed / counts[:, None], labels

    def compute(
        self, ks: list[int] | tuple[int, ...] = (1, 5), device: torch.device | str = "cpu"
    ) -> dict[str, Any]:
        _, scores, labels = self.gather(device)
        out: dict[str, Any] = {"num_samples": len(labels)}
        if len(labels):
            out.update(topk_accuracy(scores, labels, ks))
        return out


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-class IoU and their mean from a ``(K, K)`` confusion matrix (rows: truth, cols: pred).

    IoU_c = TP / (TP + FP + FN) = M[c, c] / (row_c + col_c - M[c, c]). A class that appears in
    neither the labels nor the predictions has IoU NaN and is left out of the mean.
    """
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(dim=1) + cm.sum(dim=0) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    valid = ~iou.isnan()
    mean = float(iou[valid].mean()) if valid.any() else math.nan
    return iou, mean


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix of predictions, skipping ``ignore_index`` pixels."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted class ids and true labels of the same shape."""
        if preds.shape != target.shape:
            raise ValueError(
                f"confusion matrix: predictions {tuple(preds.shape)} and labels "
                f"{tuple(target.shape)} must have the same shape"
            )
        preds, target = preds.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()  # (N,)
        keep = target != self.ignore_index
        preds, target = preds[keep], target[keep]
        if len(target) and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"confusion matrix: labels must be in [0, {self.num_classes}) or "
                f"{self.ignore_index}, got values in [{int(target.min())}, {int(target.max())}]"
            )
        k = self.num_classes
        counts = torch.bincount(target * k + preds, minlength=k * k)
        self.matrix += counts.view(k, k)  # (K*K,) -> (K, K)

    def compute(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Mean IoU (percent), per-class IoU (percent, NaN for absent classes), pixel accuracy."""
        matrix = all_reduce_sum(self.matrix.clone().to(device)).cpu()
        iou, mean = iou_from_confusion(matrix)
        total = int(matrix.sum())
        return {
            "mean_iou": 100.0 * mean,
            "per_class_iou": [100.0 * float(v) for v in iou],
            "pixel_accuracy": 100.0 * float(matrix.diag().sum()) / max(total, 1),
            "num_pixels": total,
        }
