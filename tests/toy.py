"""Tiny models and a seeded in-memory dataset, for smoke tests of the engine.

``toy_video`` / ``toy_image`` / ``toy_seg`` are a few-thousand-parameter networks (optionally
with BatchNorm, dropout and a non-local block) that train in milliseconds per step on a CPU;
:class:`RandomDataset` yields seeded tensors in the data pipeline's dict format with a label
that a linear model can learn, plus a random flip drawn from the global torch generator so that
tests see the effect of per-sample seeding.

Configs name them by import path, as a user names their own model or dataset:
``model.name: "toy:toy_video"`` and ``data.format: "toy:datasets"`` (``data.kwargs``:
``num_samples``), with this folder on ``sys.path`` (pytest puts it there; subprocesses get it
through ``PYTHONPATH``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nonlocalnet.layers import NonLocalNd

__all__ = [
    "RandomDataset",
    "ToyClassifier",
    "ToySegmenter",
    "datasets",
    "toy_image",
    "toy_seg",
    "toy_video",
]


class ToyClassifier(nn.Module):
    """conv (stride 2) -> [BN] -> ReLU -> [non-local] -> global average pool -> dropout -> FC.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        width: channels of the conv.
        dims: 3 for video (B, C, T, H, W), 2 for images (B, C, H, W).
        norm: add BatchNorm after the conv.
        nonlocal_block: add a (space-time) non-local block after the conv (with BN iff norm).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        in_channels: int = 3,
        width: int = 8,
        dims: int = 3,
        norm: bool = False,
        nonlocal_block: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        kernel = (1, 3, 3) if dims == 3 else 3
        stride = (1, 2, 2) if dims == 3 else 2
        padding = (0, 1, 1) if dims == 3 else 1
        self.conv = conv(in_channels, width, kernel, stride=stride, padding=padding)
        bn = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        self.bn = bn(width) if norm else nn.Identity()
        self.relu = nn.ReLU()
        self.nonlocal_block = (
            NonLocalNd(width, norm=norm, dims=dims) if nonlocal_block else nn.Identity()
        )
        self.pool = nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.nonlocal_block(self.relu(self.bn(self.conv(x))))
        x = self.pool(x).flatten(1)  # (B, width)
        return self.fc(self.dropout(x))


class ToySegmenter(nn.Module):
    """conv (stride 2) -> BN -> ReLU -> 1x1 classifier, plus an auxiliary 1x1 head.

    Returns ``{"out": (B, K, H/2, W/2), "aux": (B, K, H/2, W/2)}`` in training mode and the
    ``out`` tensor in eval mode, like the segmentation models; ``aux_weight`` is read by the loss.
    """

    def __init__(self, num_classes: int = 3, *, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.aux_weight = 0.4
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.aux_classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        f = self.stem(x)
        out = self.classifier(f)
        if self.training:
            return {"out": out, "aux": self.aux_classifier(f)}
        return out


def toy_video(num_classes: int = 2, **kwargs: Any) -> nn.Module:
    return ToyClassifier(num_classes, dims=3, **kwargs)


def toy_image(num_classes: int = 2, **kwargs: Any) -> nn.Module:
    return ToyClassifier(num_classes, dims=2, **kwargs)


def toy_seg(num_classes: int = 3, **kwargs: Any) -> nn.Module:
    return ToySegmenter(num_classes, **kwargs)


class RandomDataset(torch.utils.data.Dataset):
    """Seeded tensors in the pipeline's dict format; sample ``i`` has label ``i % num_classes``.

    Args:
        task: ``video`` (``(C, T, H, W)``), ``image`` (``(C, H, W)``) or ``segmentation``
            (image + ``(H, W)`` mask, 255 on a border of ignored pixels).
        num_samples: length.
        num_classes: classes.
        size: spatial side.
        num_frames: T of the video clips.
        views: test-mode video views per sample (0 = training mode, one clip with a random flip).
        seed: data seed.
    """

    def __init__(
        self,
        task: str = "video",
        *,
        num_samples: int = 16,
        num_classes: int = 2,
        size: int = 8,
        num_frames: int = 4,
        views: int = 0,
        seed: int = 0,
    ) -> None:
        self.task = task
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.size = size
        self.num_frames = num_frames
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def _clip(self, index: int, label: int, view: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index * 101 + view)
        shape = (3, self.num_frames, self.size, self.size)
        if self.task != "video":
            shape = (3, self.size, self.size)
        x = 0.5 * torch.randn(shape, generator=g)
        x[label % 3] += 1.0 + label // 3  # the class signal: a channel offset
        return x

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        sample: dict[str, Any] = {"index": index, "path": f"random/{index}", "skipped": 0}
        if self.task == "segmentation":
            image = self._clip(index, 0)
            g = torch.Generator().manual_seed(self.seed + index)
            mask = torch.randint(0, self.num_classes, (self.size, self.size), generator=g)
            for c in range(min(self.num_classes, 3)):
                image[c] += 2.0 * (mask == c).float()  # (H, W) broadcast
            mask[0, :] = 255
            sample.update(image=image, label=mask)
            return sample
        if self.views:
            views = [self._clip(index, label, v) for v in range(self.views)]
            sample.update(video=torch.stack(views), label=label)  # (V, C, T, H, W)
            return sample
        x = self._clip(index, label)
        if torch.rand(()) < 0.5:  # augmentation drawn from the global generator
            x = x.flip(-1)
        sample.update({"video" if self.task == "video" else "image": x, "label": label})
        return sample


def datasets(config: Any, split: str) -> RandomDataset:
    """The ``data.format: "toy:datasets"`` reader: a seeded :class:`RandomDataset` per split.

    ``data.kwargs`` may set ``num_samples`` (default 64); the validation split yields the test
    protocol's ``eval.num_clips x eval.num_crops`` views of each video.
    """
    data = config.data
    kwargs = dict(data.kwargs)
    views = 0
    if split != "train" and data.task == "video":
        views = config.eval.num_clips * config.eval.num_crops
    return RandomDataset(
        data.task,
        num_samples=int(kwargs.pop("num_samples", 64)),
        num_classes=data.num_classes,
        size=data.train_crop,
        num_frames=data.num_frames,
        views=views,
        seed=config.train.seed + (0 if split == "train" else 1),
        **kwargs,
    )
