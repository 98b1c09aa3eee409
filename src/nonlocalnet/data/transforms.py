"""Spatial transforms in pure torch, for videos ``(C, T, H, W)`` and images ``(C, H, W)``.

Every transform is a small callable ``op(x, generator=None)`` acting on the last two dimensions
(H, W), so the same objects serve videos and images. Random choices are drawn from ``generator``
(a ``torch.Generator``), so a pipeline is deterministic given the generator's seed. Inputs may be
``uint8`` (0..255) or floating point; every op except :class:`Normalize` keeps the dtype, and
:class:`Normalize` maps ``uint8`` to float by dividing by 255 first.

Factories build the papers' pipelines:

- :func:`video_train_transform`: short side jittered in [256, 320] → random 224 crop → horizontal
  flip → normalise (NL paper, training).
- :func:`video_test_transform`: short side 256 → 3 crops of 256 along the long side (left / centre /
  right for landscape, top / centre / bottom for portrait) → normalise; returns
  ``(3, C, T, S, S)`` in that crop order.
- :func:`image_train_transform` / :func:`image_test_transform`: ImageNet-style random resized crop
  + flip, and resize short side + centre crop.
- :class:`JointRandomScale`, :class:`JointRandomCrop`, :class:`JointHorizontalFlip`: segmentation
  transforms applied to an image and its mask together (mask resized with nearest, crops padded
  with the ignore index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Kinetics normalisation used by SlowFast / pytorchvideo for the NL models.
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[..., torch.Tensor]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _check_spatial(x: object, min_dims: int = 3) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"transform input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dims or any(s == 0 for s in x.shape):
        raise ValueError(
            f"transform input must be a non-empty (C, H, W) or (C, T, H, W) tensor, "
            f"got shape {tuple(x.shape)}"
        )
    return x


def _size_pair(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"{name} must be an int or (H, W), got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return pair


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize the last two dims of ``x`` to ``size`` = (H, W), keeping the dtype.

    Bilinear resizing uses antialiasing when shrinking; ``mode="nearest"`` is for label masks.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    shrink = size[0] < h or size[1] < w
    if mode == "bilinear" and x.dtype == torch.uint8 and x.dim() in (3, 4):
        # torch's native uint8 kernel (channels-last) is about twice as fast as a float round trip
        batched = x.unsqueeze(0) if x.dim() == 3 else x.transpose(0, 1)  # (1 or T, C, H, W)
        out = F.interpolate(
            batched.contiguous(memory_format=torch.channels_last),
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )
        out = out.squeeze(0) if x.dim() == 3 else out.transpose(0, 1)  # (C, [T,] H', W')
        return out.contiguous()
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)  # (N, 1, H, W): every channel / frame resized independently
    if mode == "nearest":
        out = F.interpolate(flat.float(), size=size, mode="nearest-exact")
    else:
        out = F.interpolate(
            flat.float(), size=size, mode=mode, align_corners=False, antialias=shrink
        )
    if not x.is_floating_point():
        out = out.round_().clamp_(torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max)
    return out.to(x.dtype).reshape(*lead, *size)  # (..., H', W')


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(H', W') with the short side equal to ``short`` and the aspect ratio kept."""
    if h <= w:
        return short, max(1, round(w * short / h))
    return max(1, round(h * short / w)), short


def crop(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Crop the last two dims; the window must lie inside the input."""
    h, w = x.shape[-2:]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise ValueError(
            f"crop window (top={top}, left={left}, {height}x{width}) does not fit an input of "
            f"{h}x{w}; resize the input to at least the crop size first"
        )
    return x[..., top : top + height, left : left + width]


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class ShortSideScale:
    """Resize so the short side is ``size``, or a random integer in ``[low, high]``.

    Args:
        size: the short side, or ``(low, high)`` for scale jittering (the NL paper uses
            ``(256, 320)`` for training).
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        low, high = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if low < 1 or high < low:
            raise ValueError(f"short side size must be positive with low <= high, got {size!r}")
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_spatial(x)
        short = self.low if self.low == self.high else _randint(self.low, self.high, generator)
        return resize(x, short_side_size(*x.shape[-2:], short))

    def __repr__(self) -> str:
        return f"ShortSideScale({self.low}, {self.high})"


class RandomCrop:
    """Crop a random ``size`` window (same window for every frame)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair("crop size", size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_spatial(x)
        h, w = x.shape[-2:]
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"crop size {ch}x{cw} larger than the input {h}x{w}")
        top = _randint(0, h - ch, generator)
        left = _randint(0, w - cw, generator)
        return crop(x, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """Crop the central ``size`` window."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair("crop size", size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_spatial(x)
        h, w = x.shape[-2:]
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"crop size {ch}x{cw} larger than the input {h}x{w}")
        return crop(x, (h - ch) // 2, (w - cw) // 2, ch, cw)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class ThreeCrop:
    """Three ``size`` × ``size`` crops along the long side: start, centre, end.

    Landscape inputs give left / centre / right crops (vertically centred), portrait inputs give top
    / centre / bottom. Returns the crops stacked in that order on a new first dimension:
    ``(3, *x.shape[:-2], size, size)``. With ``num_crops=1`` only the centre crop is returned,
    ``(1, *x.shape[:-2], size, size)``.
    """

    def __init__(self, size: int, *, num_crops: int = 3) -> None:
        self.size = _size_pair("crop size", size)[0]
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        self.num_crops = num_crops

    def offsets(self, h: int, w: int) -> list[tuple[int, int]]:
        """(top, left) of the three crops for an input of ``h`` × ``w``."""
        s = self.size
        if s > h or s > w:
            raise ValueError(f"crop size {s}x{s} larger than the input {h}x{w}")
        if w >= h:
            top = (h - s) // 2
            offsets = [(top, 0), (top, (w - s) // 2), (top, w - s)]
        else:
            left = (w - s) // 2
            offsets = [(0, left), ((h - s) // 2, left), (h - s, left)]
        return offsets if self.num_crops == 3 else offsets[1:2]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_spatial(x)
        s = self.size
        crops = [crop(x, t, l, s, s) for t, l in self.offsets(*x.shape[-2:])]
        return torch.stack(crops)  # (3, C, T, S, S) for a video

    def __repr__(self) -> str:
        return f"ThreeCrop({self.size}, num_crops={self.num_crops})"


class RandomHorizontalFlip:
    """Flip the last dimension with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) < self.p:
            return x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(x / 255 - mean) / std`` per channel for uint8, ``(x - mean) / std`` for floats in [0, 1].

    The channel dimension is the first one of a ``(C, ...)`` tensor, or the second one of a stacked
    multi-view ``(V, C, ...)`` tensor when ``channel_dim=1``.
    """

    def __init__(
        self,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        *,
        channel_dim: int = 0,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(
                f"mean and std must have the same length, got {len(mean)} and {len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channel_dim = channel_dim

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_spatial(x)
        c = x.shape[self.channel_dim]
        if c != len(self.mean):
            raise ValueError(
                f"Normalize expects {len(self.mean)} channels in dim {self.channel_dim}, "
                f"got {c} in shape {tuple(x.shape)}"
            )
        out = x.float() / 255.0 if not x.is_floating_point() else x
        shape = [1] * x.dim()
        shape[self.channel_dim] = c
        mean = torch.tensor(self.mean, dtype=out.dtype).view(
            shape
        )  # (C, 1, 1, ...) or (1, C, 1, ...): along channel_dim
        std = torch.tensor(self.std, dtype=out.dtype).view(
            shape
        )  # (C, 1, 1, ...) or (1, C, 1, ...): along channel_dim
        return (out - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomResizedCrop:
    """Inception-style crop: random area fraction and aspect ratio, resized to ``size``.

    Follows torchvision's algorithm: up to 10 tries to draw an area in ``scale`` × input area and a
    log-uniform aspect ratio in ``ratio`` that fits; otherwise a centre crop of the clamped ratio.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = _size_pair("crop size", size)
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad scale {scale} or ratio {ratio}")
        self.scale, self.ratio = scale, ratio

    def window(
        self, h: int, w: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop window for an ``h`` × ``w`` input."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            cw = round(math.sqrt(target * aspect))
            ch = round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return _randint(0, h - ch, generator), _randint(0, w - cw, generator), ch, cw
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            ch, cw = h, w
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_spatial(x)
        top, left, ch, cw = self.window(*x.shape[-2:], generator)
        return resize(crop(x, top, left, ch, cw), self.size)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


def video_train_transform(
    *,
    short_side: tuple[int, int] = (256, 320),
    crop_size: int = 224,
    flip_p: float = 0.5,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
) -> Compose:
    """Short-side jitter → random crop → flip → normalise, on ``(C, T, H, W)``."""
    return Compose(
        [ShortSideScale(short_side), RandomCrop(crop_size), RandomHorizontalFlip(flip_p),
         Normalize(mean, std)]
    )  # fmt: skip


def video_test_transform(
    *,
    short_side: int = 256,
    crop_size: int = 256,
    num_crops: int = 3,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
) -> Compose:
    """Short side → ``num_crops`` crops (3: start/centre/end; 1: centre) → normalise.

    Returns ``(num_crops, C, T, S, S)``.
    """
    crops = ThreeCrop(crop_size, num_crops=num_crops)
    return Compose([ShortSideScale(short_side), crops, Normalize(mean, std, channel_dim=1)])


def image_train_transform(
    *,
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Random resized crop → flip → normalise, on ``(C, H, W)``."""
    return Compose(
        [RandomResizedCrop(crop_size, scale=scale), RandomHorizontalFlip(flip_p),
         Normalize(mean, std)]
    )  # fmt: skip


def image_test_transform(
    *,
    short_side: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Resize short side → centre crop → normalise, on ``(C, H, W)``."""
    return Compose([ShortSideScale(short_side), CenterCrop(crop_size), Normalize(mean, std)])


# --- joint image + mask transforms (segmentation) -------------------------------------------------


class JointRandomScale:
    """Rescale image (bilinear) and mask (nearest) by a random factor in ``scale_range``."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.scale_range = scale_range

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        factor = _uniform(*self.scale_range, generator)
        h, w = image.shape[-2:]
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        return resize(image, size), resize(mask, size, mode="nearest")

    def __repr__(self) -> str:
        return f"JointRandomScale({self.scale_range})"


class JointRandomCrop:
    """Random ``size`` crop of image and mask; smaller inputs are padded first.

    Padding puts ``fill`` into the image and ``ignore_index`` into the mask (bottom / right), so
    padded pixels never count in the loss.
    """

    def __init__(
        self, size: int | Sequence[int], *, ignore_index: int = 255, fill: float = 0
    ) -> None:
        self.size = _size_pair("crop size", size)
        self.ignore_index, self.fill = ignore_index, fill

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ch, cw = self.size
        h, w = image.shape[-2:]
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=self.fill)
            mask = F.pad(mask, (0, pw, 0, ph), value=self.ignore_index)
            h, w = h + ph, w + pw
        top, left = _randint(0, h - ch, generator), _randint(0, w - cw, generator)
        return crop(image, top, left, ch, cw), crop(mask, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"JointRandomCrop({self.size}, ignore_index={self.ignore_index})"


class JointHorizontalFlip:
    """Flip image and mask together with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if float(torch.rand((), generator=generator)) < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask

    def __repr__(self) -> str:
        return f"JointHorizontalFlip(p={self.p})"


class JointCompose:
    """Apply joint transforms in order, then ``image_transform`` (e.g. Normalize) to the image."""

    def __init__(
        self, transforms: Sequence[Callable[..., tuple[torch.Tensor, torch.Tensor]]],
        image_transform: Transform | None = None,
    ) -> None:  # fmt: skip
        self.transforms = list(transforms)
        self.image_transform = image_transform

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for t in self.transforms:
            image, mask = t(image, mask, generator=generator)
        if self.image_transform is not None:
            image = self.image_transform(image, generator=generator)
        return image, mask


def segmentation_train_transform(
    *,
    crop_size: int | Sequence[int] = 769,
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip_p: float = 0.5,
) -> JointCompose:
    """Random scale → crop (padded with the ignore index) → flip → normalise the image."""
    return JointCompose(
        [JointRandomScale(scale_range), JointRandomCrop(crop_size, ignore_index=ignore_index),
         JointHorizontalFlip(flip_p)],
        Normalize(mean, std),
    )  # fmt: skip


def segmentation_test_transform(
    *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> JointCompose:
    """Full-resolution image, normalised; mask untouched."""
    return JointCompose([], Normalize(mean, std))
