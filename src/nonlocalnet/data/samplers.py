"""Clip samplers: which frame indices of a video make up each clip.

A clip is ``num_frames`` frames taken every ``stride`` frames (the NL paper's "32×2" is 32 frames at
stride 2; "8×8" is 8 frames at stride 8), so it spans ``(num_frames - 1) * stride + 1`` frames of
the video. A sampler is called with the video's frame count and returns a list of clips, each a
list of frame indices in ``[0, num_video_frames)``.

Short videos (fewer frames than a clip spans): with ``pad="loop"`` (default) the indices wrap around
to the start of the video (``i % num_video_frames``), as in the paper's loop padding; with
``pad="repeat_last"`` indices past the end repeat the last frame.
"""

from __future__ import annotations

import torch

from .._checks import check_choice

PAD_MODES = ("loop", "repeat_last")


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def clip_span(num_frames: int, stride: int) -> int:
    """Number of video frames a clip of ``num_frames`` at ``stride`` covers."""
    return (num_frames - 1) * stride + 1


def clip_indices(
    start: int, num_frames: int, stride: int, num_video_frames: int, pad: str = "loop"
) -> list[int]:
    """Frame indices of one clip starting at ``start``, padded for short videos.

    Args:
        start: index of the clip's first frame.
        num_frames: frames in the clip (T).
        stride: distance between consecutive clip frames (s).
        num_video_frames: frames in the video.
        pad: ``"loop"`` wraps past-the-end indices to the start; ``"repeat_last"`` clamps them to
            the last frame.

    Returns:
        ``num_frames`` indices in ``[0, num_video_frames)``.
    """
    check_choice("pad", pad, PAD_MODES)
    _check_positive("num_video_frames", num_video_frames)
    raw = [start + t * stride for t in range(num_frames)]
    if pad == "loop":
        return [i % num_video_frames for i in raw]
    return [min(i, num_video_frames - 1) for i in raw]


class RandomClipSampler:
    """Training sampler: one clip at a uniformly random start.

    Args:
        num_frames: frames per clip (T).
        stride: sampling stride (s).
        pad: how clips longer than the video are filled (see the module docstring).
    """

    def __init__(self, num_frames: int, stride: int, *, pad: str = "loop") -> None:
        self.num_frames = _check_positive("num_frames", num_frames)
        self.stride = _check_positive("stride", stride)
        check_choice("pad", pad, PAD_MODES)
        self.pad = pad

    @property
    def num_clips(self) -> int:
        return 1

    def __call__(
        self, num_video_frames: int, generator: torch.Generator | None = None
    ) -> list[list[int]]:
        """Return ``[indices]`` for one random clip of a video with ``num_video_frames`` frames."""
        _check_positive("num_video_frames", num_video_frames)
        max_start = max(num_video_frames - clip_span(self.num_frames, self.stride), 0)
        start = int(torch.randint(0, max_start + 1, (1,), generator=generator))
        return [clip_indices(start, self.num_frames, self.stride, num_video_frames, self.pad)]

    def __repr__(self) -> str:
        return f"RandomClipSampler(num_frames={self.num_frames}, stride={self.stride}, pad={self.pad!r})"


class UniformClipSampler:
    """Test sampler: ``num_clips`` clips with uniformly spaced starts covering the video.

    With ``D = max(num_video_frames - span, 0)`` the k-th clip starts at ``round(k * D / (K - 1))``:
    the first clip starts at frame 0 and the last one ends at the last frame. A single clip
    (``K = 1``) is centred.

    Args:
        num_frames: frames per clip (T).
        stride: sampling stride (s).
        num_clips: clips per video (K; the paper tests with 10).
        pad: how clips longer than the video are filled (see the module docstring).
    """

    def __init__(self, num_frames: int, stride: int, num_clips: int, *, pad: str = "loop") -> None:
        self.num_frames = _check_positive("num_frames", num_frames)
        self.stride = _check_positive("stride", stride)
        self._num_clips = _check_positive("num_clips", num_clips)
        check_choice("pad", pad, PAD_MODES)
        self.pad = pad

    @property
    def num_clips(self) -> int:
        return self._num_clips

    def starts(self, num_video_frames: int) -> list[int]:
        """First frame index of each clip."""
        _check_positive("num_video_frames", num_video_frames)
        delta = max(num_video_frames - clip_span(self.num_frames, self.stride), 0)
        if self._num_clips == 1:
            return [delta // 2]
        return [round(k * delta / (self._num_clips - 1)) for k in range(self._num_clips)]

    def __call__(
        self, num_video_frames: int, generator: torch.Generator | None = None
    ) -> list[list[int]]:
        """Return the K clips' indices (``generator`` is accepted and unused)."""
        return [
            clip_indices(s, self.num_frames, self.stride, num_video_frames, self.pad)
            for s in self.starts(num_video_frames)
        ]

    def __repr__(self) -> str:
        return (
            f"UniformClipSampler(num_frames={self.num_frames}, stride={self.stride}, "
            f"num_clips={self._num_clips}, pad={self.pad!r})"
        )
