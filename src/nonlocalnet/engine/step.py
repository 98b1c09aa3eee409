"""What one step of training or evaluation needs: device, autocast, batches, loss, loaders.

Both :mod:`nonlocalnet.engine.train` and :mod:`nonlocalnet.engine.evaluate` build on these; this
module imports neither.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nonlocalnet.data.samples import SkipTracker
from nonlocalnet.engine.distributed import DistInfo, all_reduce_max, all_reduce_sum
from nonlocalnet.engine.stopping import ignore_stop_signals

__all__ = [
    "autocast_context",
    "compute_loss",
    "detection_batch",
    "make_loader",
    "model_output",
    "resolve_device",
    "seed_everything",
    "skip_totals",
    "split_batch",
]


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    """``auto`` → this process's CUDA device when available, else the CPU.

    Raises:
        ValueError: an unknown device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"train.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} asked for but CUDA is not available")
    return device


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for ``train.amp`` (none / bfloat16 / float16) on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "float16" and device.type != "cuda":
        raise ValueError("train.amp: float16 needs a CUDA device; use bfloat16 on the CPU")
    dtype = torch.bfloat16 if amp == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:  # pragma: no cover
        pass


def split_batch(batch: dict[str, Any], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a batch dict (``video`` or ``image``; ``label``/``mask``)."""
    if not isinstance(batch, dict):
        raise TypeError(f"expected the dataset to yield dicts, got {type(batch).__name__}")
    for key in ("video", "image"):
        if key in batch:
            inputs = batch[key]
            break
    else:
        raise KeyError(f"batch has no 'video' or 'image' entry; keys: {sorted(batch)}")
    for key in ("label", "mask", "target"):
        if key in batch:
            target = batch[key]
            break
    else:
        raise KeyError(f"batch has no 'label' or 'mask' entry; keys: {sorted(batch)}")
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)
    return inputs, target.long()


def detection_batch(
    batch: dict[str, Any], device: torch.device | str
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``(images, targets)`` of a detection batch (:func:`~nonlocalnet.data.coco.collate_detection`)
    on ``device``: the lists torchvision's detectors take (tensors of the targets moved, other
    entries such as ``image_id`` kept)."""
    if not isinstance(batch, dict) or "image" not in batch or "target" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(f"a detection batch needs 'image' and 'target' lists; got {keys}")
    images = [im.to(device, non_blocking=True) for im in batch["image"]]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
         for k, v in t.items()}
        for t in batch["target"]
    ]  # fmt: skip
    return images, targets


def model_output(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(main, aux)`` logits of a model's output: a tensor, ``{"out", "aux"}`` or ``(out, aux)``."""
    if isinstance(output, dict):
        return output["out"], output.get("aux")
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def compute_loss(
    output: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...],
    target: torch.Tensor,
    *,
    task: str,
    ignore_index: int = 255,
    aux_weight: float = 0.4,
) -> torch.Tensor:
    """Cross-entropy; segmentation: with ``ignore_index``, logits upsampled to the label size,
    plus ``aux_weight`` x the auxiliary head's loss when the model returns one
    (``{"out": ..., "aux": ...}`` or ``(out, aux)``)."""
    main, aux = model_output(output)
    if task != "segmentation":
        return F.cross_entropy(main.float(), target)

    counted = (target != ignore_index).sum()

    def seg_ce(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(
                logits, size=target.shape[-2:], mode="bilinear", align_corners=False
            )
        # the mean over the pixels that count; a batch whose pixels are all ignored gives 0
        total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        return total / counted.clamp(min=1)

    loss = seg_ce(main)
    if aux is not None and aux_weight:
        loss = loss + aux_weight * seg_ce(aux)
    return loss


def make_loader(
    dataset: Dataset,
    batch_sampler: Any,
    *,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    """A DataLoader over a batch sampler with its own seeded generator (so that creating its
    iterator does not draw from the global torch generator); its workers leave SIGINT/SIGTERM
    to the main process, which stops the run cleanly."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        persistent_workers=False,
        collate_fn=collate_fn,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


def skip_totals(skips: SkipTracker) -> tuple[int, int]:
    """``(unreadable, read)`` entries of a :class:`SkipTracker`, combined over processes."""
    read, failed, anonymous = (t.clone() for t in skips.state())
    read, failed = all_reduce_max(read.int()), all_reduce_max(failed.int())
    return SkipTracker.counts_of(read, failed, all_reduce_sum(anonymous))
