"""COCO box and mask AP of detector predictions, with pycocotools' COCOeval.

Predictions are torchvision's detector outputs, one dict per image: ``boxes`` (N, 4) x1 y1 x2 y2
in the image's pixels, ``labels`` (N,), ``scores`` (N,) and, for Mask R-CNN, ``masks``
(N, 1, H, W) probabilities pasted into the image. They become COCO results: boxes as
``[x, y, w, h]``, labels mapped to category ids, masks thresholded at 0.5 and RLE-encoded
(``pycocotools.mask``). COCOeval then gives the 12 standard numbers per IoU type (:data:`STATS`:
AP at IoU 0.50:0.95, AP50, AP75, AP small/medium/large, AR at 1/10/100 detections, AR by size),
as fractions in [0, 1]; -1 where the ground truth has no object of that size.

``backend="faster_coco_eval"`` runs the same protocol with faster-coco-eval's C++ COCOeval
(faster on the 5000 images of val2017); the tests check that both give the same 12 numbers.
pycocotools is the default: it is the protocol the papers' numbers come from.

Under DDP each process adds the predictions of its shard; :meth:`COCOEvaluator.synchronize`
gathers them on every process (``torch.distributed.all_gather_object``: the RLE strings are
not tensors). An image seen twice (a distributed sampler pads its shards with repeats) counts
once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from nonlocalnet._checks import check_choice
from nonlocalnet.engine.step import detection_batch

__all__ = [
    "BACKENDS",
    "IOU_TYPES",
    "STATS",
    "COCOEvaluator",
    "coco_stats",
    "collect_detections",
    "evaluate_detector",
    "format_metrics",
    "predictions_to_coco",
]

logger = logging.getLogger(__name__)

#: COCOeval's ``stats`` in order (``summarize()`` for boxes and masks).
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")


def _quiet() -> contextlib.AbstractContextManager[Any]:
    """pycocotools prints its progress to stdout."""
    return contextlib.redirect_stdout(io.StringIO())


def predictions_to_coco(
    prediction: Mapping[str, Tensor],
    image_id: int,
    *,
    label_to_category: Mapping[int, int] | None = None,
    mask_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """One image's detector output as COCO results.

    Args:
        prediction: ``boxes`` (N, 4) x1 y1 x2 y2, ``labels`` (N,), ``scores`` (N,), optionally
            ``masks`` (N, 1, H, W) or (N, H, W) probabilities.
        image_id: the COCO image id.
        label_to_category: label → category id (default: labels are the category ids).
        mask_threshold: mask probability above which a pixel belongs to the object.

    Returns:
        ``{"bbox": [...], "segm": [...]}`` (``segm`` empty without masks), JSON-safe.
    """
    for key in ("boxes", "labels", "scores"):
        if key not in prediction:
            raise KeyError(f"a prediction needs 'boxes', 'labels' and 'scores', missing {key!r}")
    boxes = prediction["boxes"].detach().to("cpu", torch.float64)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N, 4) x1 y1 x2 y2, got shape {tuple(boxes.shape)}")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (N, 4) x y w h
    scores = prediction["scores"].detach().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    if not len(scores) == len(labels) == len(xywh):
        raise ValueError(
            f"boxes, labels and scores must have one entry per detection, got {len(xywh)}, "
            f"{len(labels)} and {len(scores)}"
        )
    cats = [_category(int(lab), label_to_category) for lab in labels]
    out: dict[str, list[dict[str, Any]]] = {
        "bbox": [
            {"image_id": int(image_id), "category_id": c, "bbox": b, "score": float(s)}
            for c, b, s in zip(cats, xywh.tolist(), scores, strict=True)
        ],
        "segm": [],
    }
    masks = prediction.get("masks")
    if masks is not None:
        from pycocotools import mask as mask_utils

        m = masks.detach()
        if m.dim() == 4:
            m = m[:, 0]  # (N, H, W)
        if m.dim() != 3 or m.shape[0] != len(cats):
            raise ValueError(
                f"masks must be (N, 1, H, W) or (N, H, W) with N = {len(cats)}, got shape "
                f"{tuple(masks.shape)}"
            )
        binary = (m > mask_threshold).to("cpu", torch.uint8).numpy()  # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # (H, W, N)
        for c, rle, s in zip(cats, rles, scores, strict=True):
            counts = (
                rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
            )
            out["segm"].append(
                {
                    "image_id": int(image_id),
                    "category_id": c,
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": counts},
                    "score": float(s),
                }
            )
    return out


def _category(label: int, mapping: Mapping[int, int] | None) -> int:
    if mapping is None:
        return label
    if label not in mapping:
        raise ValueError(f"label {label} has no category id; known labels: {sorted(mapping)[:20]}")
    return int(mapping[label])


def _load_gt(coco_gt: Any) -> Any:
    from pycocotools.coco import COCO

    if isinstance(coco_gt, (str, os.PathLike)):
        if not os.path.isfile(coco_gt):
            raise FileNotFoundError(f"COCO ground-truth file not found: {coco_gt}")
        with _quiet():
            return COCO(str(coco_gt))
    if isinstance(coco_gt, Mapping):
        gt = COCO()
        gt.dataset = dict(coco_gt)
        with _quiet():
            gt.createIndex()
        return gt
    if hasattr(coco_gt, "dataset") and hasattr(coco_gt, "getImgIds"):
        return coco_gt
    raise TypeError(
        f"coco_gt must be a pycocotools COCO, an annotation dict or a file path, got "
        f"{type(coco_gt).__name__}"
    )


def coco_stats(
    coco_gt: Any,
    results: Sequence[Mapping[str, Any]],
    iou_type: str,
    *,
    img_ids: Iterable[int] | None = None,
    backend: str = "pycocotools",
) -> tuple[dict[str, float], str]:
    """Run COCOeval on COCO results.

    Args:
        coco_gt: ground truth: ``pycocotools.coco.COCO``, an annotation dict or a file path.
        results: COCO results of ``iou_type`` (``bbox`` or ``segmentation`` entries).
        iou_type: ``"bbox"`` or ``"segm"``.
        img_ids: images evaluated (default: all images of the ground truth).
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.

    Returns:
        ``({"AP": ..., ..., "ARl": ...}, table)``: the 12 numbers and the text ``summarize()``
        prints.
    """
    check_choice("iou_type", iou_type, IOU_TYPES)
    check_choice("backend", backend, BACKENDS)
    gt = _load_gt(coco_gt)
    ids = sorted(gt.getImgIds() if img_ids is None else {int(i) for i in img_ids})
    results = [dict(r) for r in results]  # loadRes adds keys to its input
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with _quiet():
            dt = gt.loadRes(results) if results else COCO()
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            ev.summarize()
        text = table.getvalue()
    else:
        import faster_coco_eval as fce

        fast_gt = fce.COCO(gt.dataset, use_deepcopy=True)  # leave pycocotools' dict alone
        dt = fast_gt.loadRes(results) if results else fce.COCO()
        lines: list[str] = []
        ev = fce.COCOeval_faster(fast_gt, dt, iou_type, print_function=lines.append)
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        lines.clear()
        ev.summarize()
        text = "\n".join(str(line) for line in lines) + "\n"
    stats = {name: float(v) for name, v in zip(STATS, list(ev.stats)[: len(STATS)], strict=True)}
    return stats, text


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The 6 AP numbers per IoU type, in percent, one row each (mmdetection's summary); ``-``
    where the ground truth has no object of that size (COCOeval's -1)."""
    names = STATS[:6]
    rows = [f"{'':6s}" + "".join(f"{n:>7s}" for n in names)]
    for iou_type in IOU_TYPES:
        if iou_type in metrics:
            vals = metrics[iou_type]
            cells = [f"{100 * vals[n]:7.1f}" if vals[n] >= 0 else f"{'-':>7s}" for n in names]
            rows.append(f"{iou_type:6s}" + "".join(cells))
    return "\n".join(rows)


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class COCOEvaluator:
    """Collect detector predictions and compute COCO box / mask AP.

    Args:
        coco_gt: ground truth: ``pycocotools.coco.COCO`` (e.g. ``COCODetection.coco()``), an
            annotation dict or a file path.
        iou_types: ``("bbox", "segm")``, or ``("bbox",)`` for a box-only detector.
        label_to_category: label → category id (``COCODetection.label_to_category``; default:
            labels are the category ids).
        mask_threshold: mask probability threshold.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.
    """

    def __init__(
        self,
        coco_gt: Any,
        iou_types: Sequence[str] = IOU_TYPES,
        *,
        label_to_category: Mapping[int, int] | None = None,
        mask_threshold: float = 0.5,
        backend: str = "pycocotools",
    ) -> None:
        iou_types = tuple(iou_types)
        if not iou_types:
            raise ValueError("iou_types must name at least one of 'bbox', 'segm'")
        for t in iou_types:
            check_choice("iou_type", t, IOU_TYPES)
        check_choice("backend", backend, BACKENDS)
        if not 0.0 <= mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must lie in [0, 1), got {mask_threshold}")
        self.coco_gt = _load_gt(coco_gt)
        self.iou_types = iou_types
        self.label_to_category = None if label_to_category is None else dict(label_to_category)
        self.mask_threshold = mask_threshold
        self.backend = backend
        self._known = set(self.coco_gt.getImgIds())
        self._results: dict[int, dict[str, list[dict[str, Any]]]] = {}
        self.tables: dict[str, str] = {}

    def __len__(self) -> int:
        """Images seen so far."""
        return len(self._results)

    def reset(self) -> None:
        self._results.clear()
        self.tables.clear()

    def update(self, predictions: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int]) -> None:
        """Add the predictions of a batch (one dict per image, in the order of ``image_ids``).

        An image already seen keeps its first predictions.
        """
        predictions, image_ids = list(predictions), [int(i) for i in image_ids]
        if len(predictions) != len(image_ids):
            raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
        for pred, image_id in zip(predictions, image_ids, strict=True):
            if image_id not in self._known:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if image_id in self._results:
                continue
            if "segm" in self.iou_types and "masks" not in pred:
                raise ValueError("segm evaluation needs 'masks' in the predictions (Mask R-CNN)")
            if "segm" not in self.iou_types:
                pred = {k: v for k, v in pred.items() if k != "masks"}  # no RLE to encode
            self._results[image_id] = predictions_to_coco(
                pred,
                image_id,
                label_to_category=self.label_to_category,
                mask_threshold=self.mask_threshold,
            )

    def synchronize(self) -> None:
        """Gather the predictions of every process (call it on all of them; no-op in one)."""
        if _world() <= 1:
            return
        gathered: list[Any] = [None] * _world()
        dist.all_gather_object(gathered, self._results)
        merged: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for part in gathered:  # rank order: the first copy of an image wins
            for image_id, res in part.items():
                merged.setdefault(int(image_id), res)
        self._results = merged

    def results(self) -> dict[str, list[dict[str, Any]]]:
        """COCO results of the images seen, per IoU type (JSON-safe, e.g. for test-dev)."""
        return {
            t: [r for image_id in sorted(self._results) for r in self._results[image_id][t]]
            for t in self.iou_types
        }

    def evaluate(self, *, log_tables: bool = True) -> dict[str, Any]:
        """COCOeval on the images seen.

        Returns:
            ``{"bbox": {"AP": ..., ...}, "segm": {...}, "num_images": n}`` (fractions, JSON-safe);
            the ``summarize()`` tables are kept in :attr:`tables` (and logged).

        Raises:
            ValueError: no image was added.
        """
        if not self._results:
            raise ValueError("COCOEvaluator.evaluate: no predictions were added")
        missing = len(self._known) - len(self._results)
        if missing:
            logger.warning(
                "COCO evaluation on %d of %d ground-truth images (%d without predictions)",
                len(self._results),
                len(self._known),
                missing,
            )
        out: dict[str, Any] = {}
        all_results = self.results()
        for t in self.iou_types:
            stats, table = coco_stats(
                self.coco_gt, all_results[t], t, img_ids=self._results, backend=self.backend
            )
            out[t] = stats
            self.tables[t] = table
            if log_tables:
                logger.info("COCO %s (%d images):\n%s", t, len(self._results), table.rstrip())
        out["num_images"] = len(self._results)
        if log_tables:
            logger.info("COCO AP (%%):\n%s", format_metrics(out))
        return out


@torch.no_grad()
def collect_detections(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    evaluator: COCOEvaluator,
    *,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    on_batch: Callable[[Mapping[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run a detector on batches of :func:`~nonlocalnet.data.coco.collate_detection`, add its
    predictions to ``evaluator`` and gather them over processes.

    Args:
        model: a torchvision detector (eval mode is set here and restored after).
        batches: dicts with ``"image"`` (list of (3, H, W)) and ``"target"`` (list of dicts with
            ``"image_id"``).
        evaluator: collects the predictions.
        device: where the model runs.
        autocast: the autocast context of the forward passes, if any.
        on_batch: called with each batch before it runs (the skip accounting).
        progress: called with the number of images done after each batch.
    """
    was_training = model.training
    model.eval()
    done = 0
    try:
        for batch in batches:
            if on_batch is not None:
                on_batch(batch)
            images, targets = detection_batch(dict(batch), device)
            if not images:  # every image of the batch was unreadable
                continue
            with autocast or contextlib.nullcontext():
                outputs = model(images)
            evaluator.update(outputs, [int(t["image_id"]) for t in targets])
            done += len(images)
            if progress is not None:
                progress(done)
    finally:
        model.train(was_training)
    evaluator.synchronize()


def evaluate_detector(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    evaluator: COCOEvaluator,
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    log_tables: bool = True,
) -> dict[str, Any]:
    """Run a detector on batches and evaluate (:func:`collect_detections`, then
    :meth:`COCOEvaluator.evaluate`).

    Returns:
        :meth:`COCOEvaluator.evaluate`'s metrics.
    """
    collect_detections(model, batches, evaluator, device=device, progress=progress)
    return evaluator.evaluate(log_tables=log_tables)
