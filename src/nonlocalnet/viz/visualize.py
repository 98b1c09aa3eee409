"""Attention figures of a model on one video or image.

For each attention block (all of them, or the ones named) and each query (given in input pixels,
or picked where the block's input features have the largest norm), :func:`draw_model_attention`
writes two PNGs: arrows from the query to its k most attended positions on the frames (NL paper,
Fig. 3) and the query's attention as a heat map over the frames, drawn in grey (GCNet, Fig. 1);
for a video, each is a grid of frames. Both use an absolute colour scale (0 to the largest weight
shown, the uniform weight marked) and write the weight of the query's own key next to it; the
own key can be left out (``exclude_self``). ``summary.json`` lists the queries, their own key and
its weight, and their top-k keys (feature index, weight and pixel centre).

:func:`load_input` prepares a file as at test time, from a data config (``config["data"]`` of a
checkpoint): for a video, a clip of ``num_frames`` frames every ``sampling_rate`` frames taken
from the middle of the video; short side resized to ``test_short_side``, centre crop of
``test_crop``, normalised with ``mean``/``std``. An image given to a video model is repeated over
``num_frames`` frames.

A detection model (torchvision's Mask / Faster R-CNN around our ResNet) resizes and normalises its
images itself; :func:`detection_view` runs that transform and returns the backbone with the image
it sees, so that every block of the backbone is drawn on the pixels its features come from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nonlocalnet.data.transforms import CenterCrop, Normalize, ShortSideScale
from nonlocalnet.viz.attention import (
    MIN_WEIGHT,
    attention_blocks,
    attention_figure,
    resolve_block,
    sample_dims,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "detection_view",
    "draw_model_attention",
    "is_detection_model",
    "load_image_file",
    "load_input",
    "model_is_video",
    "select_blocks",
]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def model_is_video(model: torch.nn.Module) -> bool:
    """True when the model takes clips ``(B, C, T, H, W)`` (its first convolution is 3d)."""
    return sample_dims(model) == 4


def select_blocks(
    model: nn.Module, names: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The attention blocks with these qualified names, or every attention block of the model.

    Raises:
        ValueError: a name is not an attention block of the model, or (``names`` empty) the
            model has none; the message names the model's modules.
    """
    if names:
        return [resolve_block(model, n) for n in names]
    resolve_block(model)  # raises, naming the model's modules, when there is none
    return attention_blocks(model)


def is_detection_model(model: nn.Module) -> bool:
    """True for a torchvision detector (it takes a list of images and transforms them itself)."""
    return isinstance(getattr(model, "transform", None), nn.Module) and hasattr(model, "backbone")


def load_image_file(path: str | Path) -> torch.Tensor:
    """An image file as RGB uint8 ``(H, W, 3)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image file (by its suffix).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(
            f"a detection model takes images ({', '.join(IMAGE_SUFFIXES)}), got {path.name}"
        )
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())  # (H, W, 3)


@torch.no_grad()
def detection_view(
    model: nn.Module, image: torch.Tensor
) -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    """The backbone of a detector and the image as it reaches the backbone.

    Args:
        model: a torchvision ``GeneralizedRCNN`` (``model.transform``, ``model.backbone.body``).
        image: RGB uint8 ``(H, W, 3)``, or float ``(3, H, W)`` in [0, 1] (a detection dataset's
            sample).

    Returns:
        ``(body, x, frames)``: the backbone's ResNet body, the resized and normalised image
        ``(3, H', W')`` (padded as the detector pads it) and the same pixels as uint8
        ``(1, H', W', 3)`` for drawing.
    """
    if not is_detection_model(model):
        raise ValueError(f"expected a torchvision detection model, got {type(model).__name__}")
    transform = model.transform
    transform.eval()
    uint8 = image.dtype == torch.uint8
    img = image.permute(2, 0, 1).float() / 255 if uint8 else image.float()  # (3, H, W) in [0, 1]
    batch, _ = transform([img])
    x = batch.tensors[0]  # (3, H', W'), normalised, padded
    mean = torch.as_tensor(transform.image_mean).view(3, 1, 1)
    std = torch.as_tensor(transform.image_std).view(3, 1, 1)
    shown = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)  # (3, H', W')
    frames = shown.permute(1, 2, 0).unsqueeze(0).contiguous().numpy()  # (1, H', W', 3)
    body = getattr(model.backbone, "body", model.backbone)
    return body, x, frames


def _decode_video(path: Path, num_frames: int, rate: int) -> torch.Tensor:
    from nonlocalnet.data.video import VideoReader

    with VideoReader(path) as reader:
        n = reader.num_frames
        span = (num_frames - 1) * rate + 1
        start = max(0, (n - span) // 2)
        idx = [min(start + i * rate, n - 1) for i in range(num_frames)]
        return reader.get_frames(idx)  # (T, H, W, 3) uint8


def load_input(
    path: str | Path, data: Mapping[str, Any], *, video: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """Read a video or image and prepare it as at test time.

    Args:
        path: a video (``VIDEO_SUFFIXES``) or image (``IMAGE_SUFFIXES``) file.
        data: the checkpoint's ``config["data"]`` (num_frames, sampling_rate, test_short_side,
            test_crop, mean, std; missing keys take the training defaults: 8 frames every 8,
            256, 256, 0.45, 0.225).
        video: the model takes clips ``(C, T, H, W)`` (else images ``(C, H, W)``).

    Returns:
        ``(x, frames)``: the normalised model input ``(C, T, H, W)`` / ``(C, H, W)`` and the same
        pixels as uint8 ``(T, H, W, 3)`` for drawing.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown file type, or a video given to an image model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    num_frames = int(data.get("num_frames", 8))
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if not video:
            raise ValueError(
                f"input {path.name} is a video but the model takes images; give an image "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        frames = _decode_video(path, num_frames, int(data.get("sampling_rate", 8)))
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            frames = torch.from_numpy(np.asarray(im.convert("RGB")).copy())[None]  # (1, H, W, 3)
        if video:
            frames = frames.expand(num_frames, -1, -1, -1)  # (T, H, W, 3): a still clip
    else:
        raise ValueError(
            f"unknown input type {suffix!r} of {path.name}; expected a video "
            f"({', '.join(VIDEO_SUFFIXES)}) or an image ({', '.join(IMAGE_SUFFIXES)})"
        )
    x = frames.permute(3, 0, 1, 2)  # (C, T, H, W) uint8
    x = ShortSideScale(int(data.get("test_short_side", 256)))(x)
    x = CenterCrop(int(data.get("test_crop", 256)))(x)
    shown = x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3) uint8
    x = Normalize(data.get("mean", (0.45,) * 3), data.get("std", (0.225,) * 3))(x)
    if not video:
        x = x[:, 0]  # (C, H, W)
    return x, shown


def draw_model_attention(
    model: nn.Module,
    x: torch.Tensor,
    frames: np.ndarray | torch.Tensor | None = None,
    *,
    blocks: Sequence[str] | None = None,
    queries: Sequence[Sequence[float]] | None = None,
    num_queries: int = 3,
    k: int = 20,
    out_dir: str | Path = "attention",
    model_name: str | None = None,
    input_name: str = "input",
    max_frames: int = 8,
    exclude_self: bool = False,
    min_weight: float = MIN_WEIGHT,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Draw the figures of every asked block and write ``summary.json`` to ``out_dir``.

    Args:
        model: the network (set to eval mode here).
        x: its input for one sample, ``(C, T, H, W)`` / ``(C, H, W)`` (see :func:`load_input`).
        frames: uint8 ``(T, H, W, 3)`` frames to draw on; by default the input, min-max
            stretched.
        blocks: qualified names of the blocks to draw; every attention block if None.
        queries: query pixels ``(t, y, x)`` (``(y, x)`` for images) of the prepared input; by
            default ``num_queries`` positions of highest input-feature norm per block.
        num_queries: how many queries to pick when ``queries`` is None.
        k: arrows (most attended keys) per query.
        out_dir: folder for ``{block}_q{i}_arrows.png``, ``{block}_q{i}_heatmap.png`` and
            ``summary.json``.
        model_name: name shown in the titles and the summary (default: the model's class name).
        input_name: the input's path or name, kept as given in the summary; the titles show
            its file name.
        max_frames: frames per figure.
        exclude_self: leave each query's own key out of the top k and the figures (nothing is
            renormalised; its weight stays in the summary and the titles). Pyramid blocks (APNB,
            AFNB) have no own key: asking for them raises.
        min_weight: keys of weight at or below it get no arrow.
        meta: fields put first in the summary (e.g. the checkpoint it came from).

    Returns:
        The summary: ``meta``, ``model``, ``input``, ``input_shape`` and, per block, its
        ``block`` name, ``type``, attention ``kind``, ``exclude_self`` and ``queries``
        (``feature_position``, ``pixel``, ``self_key`` and ``self_weight`` (None for a pyramid),
        ``topk_keys``, ``topk_weights``, ``topk_pixels``, ``files``).

    Raises:
        ValueError: a block name is unknown, the model has no attention block, the input or a
            query does not fit the model, or ``exclude_self`` meets a pyramid block.
    """
    selected = select_blocks(model, blocks)
    model_name = model_name or type(model).__name__
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {
        **(meta or {}),
        "model": model_name,
        "input": input_name,
        "input_shape": list(x.shape),
        "blocks": [],
    }
    for name, block in selected:
        res = attention_figure(
            model,
            x,
            frames=frames,
            block_name=name,
            queries=queries,
            num_queries=num_queries,
            k=k,
            out_dir=out_dir,
            model_name=model_name,
            input_name=Path(input_name).name,
            max_frames=max_frames,
            exclude_self=exclude_self,
            min_weight=min_weight,
        )
        entry: dict[str, Any] = {
            "block": name,
            "type": type(block).__name__,
            "kind": res.attention.kind,
            "exclude_self": exclude_self,
            "queries": [],
        }
        for pos, pix, own, own_w, (idx, w, centres), paths in zip(
            res.attention.positions,
            res.attention.pixels,
            res.self_keys,
            res.self_weights,
            res.topk,
            res.paths,
            strict=True,
        ):
            entry["queries"].append(
                {
                    "feature_position": list(pos),
                    "pixel": list(pix),
                    "self_key": own,
                    "self_weight": own_w,
                    "topk_keys": idx.tolist(),
                    "topk_weights": w.tolist(),
                    "topk_pixels": centres.tolist(),
                    "files": [str(p) for p in paths],
                }
            )
        summary["blocks"].append(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
