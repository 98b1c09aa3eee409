"""Metrics against hand-computed values: multi-view aggregation, top-k, confusion-matrix IoU."""

from __future__ import annotations

import math

import pytest
import torch

from nonlocalnet.engine.metrics import (
    ConfusionMatrix,
    ScoreAccumulator,
    iou_from_confusion,
    multiview_scores,
    topk_accuracy,
)


def test_multiview_averages_softmax_per_video_by_hand() -> None:
    # 2 videos x 2 views, 3 classes. Logits chosen so the softmaxes are easy to write down:
    # log([0.5, 0.25, 0.25]) etc.
    views = torch.tensor(
        [
            [0.5, 0.25, 0.25],  # video 0, view 0
            [0.1, 0.6, 0.3],  # video 0, view 1
            [0.2, 0.2, 0.6],  # video 1, view 0
            [0.0625, 0.5, 0.4375],  # video 1, view 1
        ],
        dtype=torch.float64,
    )
    logits = views.log() + 3.0  # a constant shift must not change the softmax
    scores = multiview_scores(logits, num_views=2)
    expected = torch.tensor([[0.3, 0.425, 0.275], [0.13125, 0.35, 0.51875]], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-6)
    # Averaging probabilities is not averaging logits (the softmax of the mean logits differs).
    mean_logit_probs = logits.view(2, 2, 3).mean(1).softmax(-1)  # (B, V, K) -> (B, K)
    assert not torch.allclose(mean_logit_probs, expected, atol=1e-3)


def test_multiview_rejects_incomplete_views() -> None:
    with pytest.raises(ValueError, match=r"\(B \* 3, K\)"):
        multiview_scores(torch.zeros(4, 5), num_views=3)


def test_topk_accuracy_by_hand() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.2],  # label 1: top1 hit
            [0.4, 0.3, 0.2, 0.1],  # label 1: top1 miss, top2 hit
            [0.1, 0.2, 0.3, 0.4],  # label 0: miss both
            [0.3, 0.1, 0.35, 0.25],  # label 3: top1 miss, top2 miss, top3 hit
        ]
    )
    labels = torch.tensor([1, 1, 0, 3])
    out = topk_accuracy(scores, labels, ks=(1, 2, 3, 5))
    assert out == pytest.approx({"top1": 25.0, "top2": 50.0, "top3": 75.0})  # top5 > 4 classes


def test_score_accumulator_merges_duplicate_indices() -> None:
    acc = ScoreAccumulator()
    # Index 2 appears twice (distributed padding): its scores are averaged, counted once.
    acc.update(torch.tensor([2, 0]), torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([1, 0]))
    acc.update(torch.tensor([1, 2]), torch.tensor([[0.6, 0.4], [0.4, 0.6]]), torch.tensor([1, 1]))
    idx, scores, labels = acc.gather()
    assert idx.tolist() == [0, 1, 2]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]))
    assert labels.tolist() == [0, 1, 1]
    out = acc.compute(ks=(1,))
    assert out == {"num_samples": 3, "top1": pytest.approx(200 / 3)}


def test_iou_from_hand_computed_confusion_matrix() -> None:
    # rows: truth, cols: prediction
    cm = torch.tensor([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 4, 0], [0, 0, 0, 0]])
    iou, mean = iou_from_confusion(cm)
    # class 0: 5 / (6 + 7 - 5) = 5/8; class 1: 3 / (6 + 4 - 3) = 3/7; class 2: 4 / (4 + 5 - 4)
    # = 4/5; class 3: absent from labels and predictions -> NaN, left out of the mean.
    torch.testing.assert_close(iou[:3], torch.tensor([5 / 8, 3 / 7, 4 / 5], dtype=torch.float64))
    assert math.isnan(iou[3])
    assert mean == pytest.approx((5 / 8 + 3 / 7 + 4 / 5) / 3)


def test_confusion_matrix_skips_ignore_index_and_matches_torchmetrics() -> None:
    from torchmetrics.functional.classification import multiclass_jaccard_index

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 16, 16), generator=g)
    target[:, :3] = 255
    preds = torch.where(torch.rand(target.shape, generator=g) < 0.6, target % 5,
                        torch.randint(0, 5, target.shape, generator=g))  # fmt: skip
    cm = ConfusionMatrix(5, ignore_index=255)
    cm.update(preds[0], target[0])
    cm.update(preds[1], target[1])
    assert int(cm.matrix.sum()) == int((target != 255).sum())
    # By hand from the kept pixels.
    keep = target != 255
    manual = torch.zeros(5, 5, dtype=torch.long)
    for t, p in zip(target[keep].tolist(), preds[keep].tolist(), strict=True):
        manual[t, p] += 1
    assert torch.equal(cm.matrix, manual)
    out = cm.compute()
    per_class = multiclass_jaccard_index(preds, target, num_classes=5, ignore_index=255,
                                         average="none")  # fmt: skip
    torch.testing.assert_close(torch.tensor(out["per_class_iou"], dtype=torch.float64) / 100, per_class.double(),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert out["mean_iou"] / 100 == pytest.approx(float(per_class.mean()), abs=1e-6)
    assert out["pixel_accuracy"] == pytest.approx(
        100 * float((preds[keep] == target[keep]).float().mean())
    )


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
