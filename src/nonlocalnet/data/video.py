"""Video classification data: list files, the Kinetics CSV, class folders, and PyAV decoding.

Three ways to describe a data set, each parsed and checked when the dataset is built, before any
training starts (a bad line stops with an error naming the file and the line number):

- a list file of ``<path> <label>`` lines (:func:`parse_list_file`; pytorchvideo / mmaction2
  style). Blank lines and lines starting with ``#`` are ignored; the label is the last
  whitespace-separated token, so paths may contain spaces; relative paths are relative to ``root``
  (default: the list file's folder);
- the Kinetics CSV ``label,youtube_id,time_start,time_end,split`` with a video root
  (:func:`parse_kinetics_csv`), files named as by the official downloader:
  ``<root>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` or ``<root>/<youtube_id>_<start>_<end>.mp4``;
- one folder per class (:func:`scan_class_folders`).

Decoding (:class:`VideoReader`) uses PyAV and decodes only what a clip needs: the frame count comes
from the stream metadata (``stream.frames``, else ``duration × time_base × rate``), the reader seeks
to the key frame before the clip's first frame (clips starting at frame 16 or later; earlier ones
decode from the start) and stops after its last one. Frame indices come from presentation
timestamps, frame 0 being the first decoded frame. When the metadata is missing it decodes every
frame once. A stream that ends well before its declared length (a truncated download) counts as
unreadable. Frames are returned as ``uint8`` ``(T, H, W, 3)`` RGB; the default single decoder
thread suits DataLoader workers (see benchmarks/RESULTS.md, section 4). ``cache_frames=True`` keeps
decoded videos in memory for small data sets.

:class:`VideoDataset` yields dicts::

    {"video": float (C, T, H, W)          # train mode, normalised
              or (K * num_crops, C, T, S, S)  # test mode: views in clip-major, crop-minor order
     "label": int, "index": int, "path": str,
     "skipped": int,                      # unreadable videos replaced to produce this sample
     "unreadable": list[str],             # their paths
     "unreadable_index": list[int]}       # and their indices

A video that cannot be opened or decoded is logged (warning, with its path). In train mode it is
replaced by the next index (``(index + 1) % len``, then the next...), so the batch stays full; in
test mode it is *not* replaced (that would change the metric): the sample comes back with
``"video": None`` and :func:`collate_samples` drops it from the batch and lists its path in
``batch["unreadable"]``. :class:`~nonlocalnet.data.samples.SkipTracker` accumulates those counts
over batches and raises when more than ``max_skip_fraction`` of the entries read failed (the
policy of every dataset here: :mod:`nonlocalnet.data.samples`).

Randomness: with ``seed`` set, each sample's clip and crop come from a generator seeded by
``(seed, epoch, index)``: independent of the number of workers (call :meth:`VideoDataset.set_epoch`
every epoch). With ``seed=None`` each process uses its own generator seeded from
``torch.initial_seed()``, which the DataLoader sets differently in every worker and every epoch, so
the clips are reproducible given ``torch.manual_seed`` and differ across workers.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .._checks import check_choice
from ._seeding import SampleSeeder
from .samplers import RandomClipSampler, UniformClipSampler
from .samples import SkipTracker, check_skip_fraction, collate_samples, read_or_skip
from .transforms import KINETICS_MEAN, KINETICS_STD, video_test_transform, video_train_transform

logger = logging.getLogger(__name__)

_SEEK_MIN_FRAMES = 16  # clips starting earlier are decoded from the start, without a seek
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
MODES = ("train", "test")


class VideoDecodeError(RuntimeError):
    """A video file that cannot be opened or decoded."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a data set.

    Attributes:
        path: absolute or root-joined path of the video file.
        label: class index.
        source: where the record was read, ``"file:line"``, for error messages.
    """

    path: str
    label: int
    source: str = ""


# --- parsing ----------------------------------------------------------------------------------------


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """``(line number, stripped line)`` of a UTF-8 text file (a byte-order mark is dropped).

    Raises:
        ValueError: the file is not UTF-8 text, naming the file and the first bad line.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{what} {path}:{lineno}: not UTF-8 text (byte {data[err.start]:#x}); save it as UTF-8"
        ) from None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        yield lineno, raw.strip()


def _require_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _require_dir(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found (or not a directory): {p}")
    return p


def _check_labels(records: Sequence[VideoRecord], num_classes: int | None, where: str) -> int:
    """Check every label is in [0, num_classes); return num_classes (inferred as max + 1)."""
    if num_classes is None:
        return max(r.label for r in records) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for r in records:
        if not 0 <= r.label < num_classes:
            raise ValueError(
                f"{r.source}: label {r.label} out of range [0, {num_classes}) in {where}"
            )
    return num_classes


def parse_list_file(
    list_file: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    check_files: bool = False,
) -> list[VideoRecord]:
    """Read a ``<path> <label>`` list file.

    Args:
        list_file: the list file.
        root: folder that relative paths are joined to (default: the list file's folder).
        num_classes: if given, every label must lie in ``[0, num_classes)``.
        check_files: also check that every video file exists.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: the list file, the root, or (with ``check_files``) a video is missing.
        ValueError: a line that does not parse, a label out of range, or no entries at all; the
            message names the file and the line number.
    """
    list_path = _require_file(list_file, "video list file")
    root_path = _require_dir(root, "video data root") if root is not None else list_path.parent
    records: list[VideoRecord] = []
    for lineno, line in _text_lines(list_path, "video list file"):
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}:{lineno}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{where}: expected '<path> <label>', got {line!r}")
        rel, label_text = parts
        extra = rel.rsplit(None, 1)
        if len(extra) == 2 and extra[1].lstrip("-").isdigit():
            # '<path> <n> <label>': another list format (frame counts, start/end times)
            raise ValueError(
                f"{where}: expected '<path> <label>', got {len(line.split())} fields in {line!r} "
                "(a path with spaces may not end in a number)"
            )
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(
                f"{where}: label must be an integer, got {label_text!r} in line {line!r} "
                "(expected '<path> <label>')"
            ) from None
        if label < 0:
            raise ValueError(f"{where}: label must be >= 0, got {label}")
        path = Path(rel) if os.path.isabs(rel) else root_path / rel
        if check_files and not path.is_file():
            raise FileNotFoundError(f"{where}: video file not found: {path}")
        records.append(VideoRecord(str(path), label, where))
    if not records:
        raise ValueError(f"video list file {list_path} has no entries")
    _check_labels(records, num_classes, str(list_path))
    return records


def read_class_list(path: str | os.PathLike[str]) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments ignored); index = line order."""
    p = _require_file(path, "class list file")
    names = [
        line for _, line in _text_lines(p, "class list file") if line and not line.startswith("#")
    ]
    if not names:
        raise ValueError(f"class list file {p} has no entries")
    if len(set(names)) != len(names):
        raise ValueError(f"class list file {p} has duplicate names")
    return names


def _kinetics_candidates(root: Path, label: str, yid: str, start: int, end: int) -> list[Path]:
    names = [f"{yid}_{start:06d}_{end:06d}", f"{yid}_{start}_{end}"]
    dirs = [root / label, root / label.replace(" ", "_"), root]
    return [d / f"{n}{ext}" for d in dirs for n in names for ext in (".mp4", ".webm", ".mkv")]


def parse_kinetics_csv(
    csv_file: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    classes: Sequence[str] | str | os.PathLike[str] | None = None,
    split: str | None = None,
    on_missing: str = "error",
) -> tuple[list[VideoRecord], list[str]]:
    """Read a Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split``).

    Args:
        csv_file: the CSV, with that header.
        root: the video root (per-label folders or flat, see the module docstring).
        classes: class names in index order, or a file of them; default: the sorted labels of the
            CSV (after the ``split`` filter).
        split: keep only rows of this split (e.g. ``"train"``); default: all rows.
        on_missing: ``"error"`` stops at the first row whose video is absent; ``"skip"`` drops such
            rows and logs how many were dropped (Kinetics downloads usually miss a few percent).

    Returns:
        ``(records, classes)``.

    Raises:
        FileNotFoundError: the CSV, the root or (with ``on_missing="error"``) a video is missing.
        ValueError: a bad header or row, a label not in ``classes``, or no usable rows; the
            message names the file and the line.
    """
    check_choice("on_missing", on_missing, ("error", "skip"))
    csv_path = _require_file(csv_file, "Kinetics CSV file")
    root_path = _require_dir(root, "video data root")
    required = ("label", "youtube_id", "time_start", "time_end")
    rows: list[tuple[str, str, int, int, str]] = []
    lines = [line for _, line in _text_lines(csv_path, "Kinetics CSV file")]
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"Kinetics CSV file {csv_path} is empty")
    header = [h.strip() for h in header]
    missing_cols = [c for c in required if c not in header]
    if missing_cols:
        raise ValueError(
            f"{csv_path}:1: header must contain {','.join(required)}[,split], got {','.join(header)}"
        )
    col = {name: header.index(name) for name in header}
    for row in reader:
        lineno = reader.line_num
        where = f"{csv_path}:{lineno}"
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{where}: expected {len(header)} fields, got {len(row)}: {row!r}")
        try:
            start = int(float(row[col["time_start"]]))
            end = int(float(row[col["time_end"]]))
        except ValueError:
            raise ValueError(
                f"{where}: time_start/time_end must be numbers, got "
                f"{row[col['time_start']]!r}, {row[col['time_end']]!r}"
            ) from None
        label = row[col["label"]].strip()
        yid = row[col["youtube_id"]].strip()
        if not label or not yid:
            raise ValueError(f"{where}: empty label or youtube_id in {row!r}")
        row_split = row[col["split"]].strip() if "split" in col else ""
        if split is not None and row_split != split:
            continue
        rows.append((label, yid, start, end, where))
    if not rows:
        extra = f" with split {split!r}" if split is not None else ""
        raise ValueError(f"Kinetics CSV file {csv_path} has no rows{extra}")
    if classes is None:
        class_names = sorted({r[0] for r in rows})
    elif isinstance(classes, (str, os.PathLike)):
        class_names = read_class_list(classes)
    else:
        class_names = list(classes)
    index = {name: i for i, name in enumerate(class_names)}
    records: list[VideoRecord] = []
    num_missing = 0
    for label, yid, start, end, where in rows:
        if label not in index:
            raise ValueError(
                f"{where}: label {label!r} is not one of the {len(class_names)} classes"
            )
        found = next(
            (p for p in _kinetics_candidates(root_path, label, yid, start, end) if p.is_file()),
            None,
        )
        if found is None:
            if on_missing == "error":
                raise FileNotFoundError(
                    f"{where}: video not found for {yid} [{start}, {end}] under {root_path} (tried "
                    f"{root_path / label / f'{yid}_{start:06d}_{end:06d}.mp4'} and flat names)"
                )
            num_missing += 1
            continue
        records.append(VideoRecord(str(found), index[label], where))
    if num_missing:
        logger.warning(
            "%s: %d of %d videos not found under %s; dropped",
            csv_path,
            num_missing,
            len(rows),
            root_path,
        )
    if not records:
        raise ValueError(
            f"Kinetics CSV file {csv_path}: none of the {len(rows)} videos found under {root_path}"
        )
    return records, class_names


def scan_class_folders(
    root: str | os.PathLike[str],
    *,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    classes: Sequence[str] | None = None,
) -> tuple[list[VideoRecord], list[str]]:
    """One sub-folder per class; class index from the sorted folder names (or ``classes``).

    Returns:
        ``(records, classes)``, files sorted by path within each class.

    Raises:
        FileNotFoundError: ``root`` or a named class folder is missing.
        ValueError: no class folders, or no files with one of ``extensions``.
    """
    root_path = _require_dir(root, "data root")
    exts = tuple(e.lower() for e in extensions)
    names = (
        sorted(d.name for d in root_path.iterdir() if d.is_dir())
        if classes is None
        else list(classes)
    )
    if not names:
        raise ValueError(f"data root {root_path} has no class sub-folders")
    records: list[VideoRecord] = []
    for label, name in enumerate(names):
        folder = _require_dir(root_path / name, f"class folder {name!r}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        records += [VideoRecord(str(p), label, str(folder)) for p in files]
    if not records:
        raise ValueError(f"data root {root_path} has no files with extensions {', '.join(exts)}")
    return records, names


# --- decoding -------------------------------------------------------------------------------------


class VideoReader:
    """Open a video with PyAV and decode selected frames (use as a context manager).

    Args:
        path: the video file.
        threads: decoder threads (FFmpeg's ``thread_count``; 0 = one per core). The default 1 is
            fastest for the small clips of a data loader, which runs several decoders in parallel
            worker processes anyway (see benchmarks/bench_decode.py).

    Raises:
        VideoDecodeError: the file cannot be opened or has no video stream.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1) -> None:
        import av

        self.path = str(path)
        self.threads = threads
        self._av = av
        try:
            self.container = av.open(self.path)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoDecodeError(f"cannot open video {self.path}: {e}") from e
        if not self.container.streams.video:
            self.container.close()
            raise VideoDecodeError(f"no video stream in {self.path}")
        self.stream = self.container.streams.video[0]
        self.stream.codec_context.thread_count = threads
        self._all: list[Any] | None = None  # every frame, when the metadata is unusable
        self._origin: int | None = None  # pts of frame 0

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    @property
    def _rate(self) -> Fraction | None:
        rate = self.stream.average_rate or self.stream.guessed_rate
        return Fraction(rate) if rate else None

    def _metadata_frames(self) -> int | None:
        s = self.stream
        if s.frames and s.frames > 0:
            return int(s.frames)
        rate = self._rate
        if rate is None:
            return None
        if s.duration and s.time_base:
            return max(1, round(s.duration * s.time_base * rate))
        if self.container.duration:
            return max(1, round(Fraction(self.container.duration, 1_000_000) * rate))
        return None

    @property
    def num_frames(self) -> int:
        """Frame count from the metadata, or from decoding every frame when it is missing."""
        n = self._metadata_frames()
        if n is None:
            n = len(self._decode_all())
            if n == 0:
                raise VideoDecodeError(f"no decodable frames in {self.path}")
        return n

    def _decode_all(self) -> list[Any]:
        if self._all is None:
            # Re-open rather than seek: a fresh demuxer and decoder start at the first frame.
            self.container.close()
            try:
                self.container = self._av.open(self.path)
            except (self._av.FFmpegError, OSError, ValueError) as e:
                raise VideoDecodeError(f"cannot open video {self.path}: {e}") from e
            self.stream = self.container.streams.video[0]
            self.stream.codec_context.thread_count = self.threads
            try:
                self._all = [
                    f.to_ndarray(format="rgb24") for f in self.container.decode(self.stream)
                ]
            except (self._av.FFmpegError, OSError, ValueError, EOFError) as e:
                raise VideoDecodeError(f"cannot decode {self.path}: {e}") from e
        return self._all

    def _index(self, pts: int, origin: int) -> int:
        return round((pts - origin) * self.stream.time_base * self._rate)

    def _decode_range(self, needed: set[int]) -> dict[int, Any] | None:
        """Decode from near min(needed) up to max(needed); None if timestamps are unusable.

        Frame 0 is the first decoded frame (its timestamp is the origin: containers such as AVI
        start at pts 1 while ``stream.start_time`` says 0). Clips starting at frame
        ``_SEEK_MIN_FRAMES`` or later seek to the key frame before them; earlier ones decode from
        the start.
        """
        s = self.stream
        if self._rate is None or s.time_base is None:
            return None
        lo, hi = min(needed), max(needed)
        frames: Iterator[Any]
        if self._origin is None:  # first call: the container is at its start
            frames = self.container.decode(s)
            first = next(frames, None)
            if first is None or first.pts is None:
                return None
            self._origin = first.pts
            frames = itertools.chain([first], frames) if lo < _SEEK_MIN_FRAMES else self._seek(lo)
        else:
            frames = self._seek(lo if lo >= _SEEK_MIN_FRAMES else 0)
        got: dict[int, Any] = {}
        last: tuple[int, Any] | None = None
        for frame in frames:
            if frame.pts is None:
                return None
            idx = self._index(frame.pts, self._origin)
            if last is None and idx > lo:
                return None  # the seek overshot the clip start
            last = (idx, frame)
            if idx in needed:
                got[idx] = frame.to_ndarray(format="rgb24")
            if idx >= hi:
                break
        if last is not None and last[0] < hi:
            declared = self._metadata_frames()
            if (
                declared is not None
                and hi < declared
                and declared - last[0] - 1 > max(2, declared // 20)
            ):
                raise VideoDecodeError(
                    f"{self.path} ends at frame {last[0]} but declares {declared} frames (truncated?)"
                )
            if last[0] not in got:  # the last frame, for indices past it
                got[last[0]] = last[1].to_ndarray(format="rgb24")
        return got

    def _seek(self, index: int) -> Iterator[Any]:
        """Seek to the key frame at or before frame ``index``; return a fresh frame iterator."""
        s = self.stream
        target = self._origin + int(Fraction(index) / self._rate / s.time_base)
        self.container.seek(target, stream=s, backward=True, any_frame=False)
        return self.container.decode(s)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode frames by index.

        Indices past the last decodable frame (metadata that over-counts) get the last decoded
        frame.

        Returns:
            ``uint8`` tensor ``(len(indices), H, W, 3)``.

        Raises:
            VideoDecodeError: the file cannot be decoded.
        """
        if not indices:
            raise ValueError("get_frames needs at least one index")
        needed = set(indices)
        got: dict[int, Any] | None = None
        if self._all is None:
            try:
                got = self._decode_range(needed)
            except (self._av.FFmpegError, OSError, ValueError, EOFError) as e:
                raise VideoDecodeError(f"cannot decode {self.path}: {e}") from e
        if got is None or not got:
            frames = self._decode_all()
            got = dict(enumerate(frames))
        if not got:
            raise VideoDecodeError(f"no decodable frames in {self.path}")
        known = sorted(got)
        out = []
        for i in indices:
            if i not in got:  # past the end, or a gap in the timestamps: nearest earlier frame
                earlier = [k for k in known if k <= i]
                i = earlier[-1] if earlier else known[0]
            out.append(torch.from_numpy(got[i]))
        return torch.stack(out)  # (T, H, W, 3)


def read_clips(
    path: str | os.PathLike[str],
    sampler: Callable[..., list[list[int]]],
    generator: torch.Generator | None = None,
    *,
    threads: int = 1,
) -> list[torch.Tensor]:
    """Open ``path``, pick clips with ``sampler`` and decode them (one pass for all clips).

    Returns:
        One ``uint8`` ``(T, H, W, 3)`` tensor per clip.

    Raises:
        VideoDecodeError: the file cannot be opened or decoded.
    """
    with VideoReader(path, threads=threads) as reader:
        clips = sampler(reader.num_frames, generator)
        flat = sorted({i for clip in clips for i in clip})
        frames = reader.get_frames(flat)  # (N, H, W, 3)
    pos = {i: k for k, i in enumerate(flat)}
    return [frames[[pos[i] for i in clip]] for clip in clips]


# --- dataset --------------------------------------------------------------------------------------


class VideoDataset(Dataset):
    """Video classification dataset over :class:`VideoRecord` s (see the module docstring).

    Build it with :meth:`from_list_file`, :meth:`from_kinetics_csv` or :meth:`from_folder`.

    Args:
        records: the videos.
        mode: ``"train"`` (one random clip, random crop and flip) or ``"test"`` (``num_clips``
            uniform clips × ``num_crops`` crops).
        num_frames: frames per clip (T).
        stride: sampling stride (s); the paper's 32×2 is ``num_frames=32, stride=2``.
        num_clips: clips per video in test mode (the paper: 10).
        num_crops: crops per clip in test mode, 3 (start/centre/end) or 1 (centre).
        short_side_range: training short-side jitter ``(low, high)``.
        crop_size: training crop.
        test_short_side: test short side.
        test_crop_size: test crop.
        mean: normalisation mean per channel (on [0, 1] values).
        std: normalisation std per channel.
        flip_p: training flip probability.
        pad: clip padding for short videos, ``"loop"`` or ``"repeat_last"``.
        transform: replaces the default transform: called as ``transform(clip, generator=g)`` on
            a ``uint8`` ``(C, T, H, W)`` clip; in test mode it must return ``(V, C, T, H, W)``.
        classes: class names in index order, if known.
        num_classes: number of classes (default: ``len(classes)`` or max label + 1).
        seed: see "Randomness" in the module docstring.
        max_attempts: how many consecutive unreadable videos a train sample may replace before
            giving up (default: ``min(len(records), 100)``).
        decode_threads: decoder threads per video (see :class:`VideoReader`).
        cache_frames: keep every decoded video (all frames, ``uint8``) in memory, per process,
            so later epochs skip decoding: for small data sets such as the built-in benchmark
            (1536 clips of 8×32×32 take 38 MB). With DataLoader workers use
            ``persistent_workers=True``, or each epoch's new workers start with an empty cache.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        mode: str = "train",
        num_frames: int = 8,
        stride: int = 8,
        num_clips: int = 10,
        num_crops: int = 3,
        short_side_range: tuple[int, int] = (256, 320),
        crop_size: int = 224,
        test_short_side: int = 256,
        test_crop_size: int = 256,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        flip_p: float = 0.5,
        pad: str = "loop",
        transform: Callable[..., torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        seed: int | None = None,
        max_attempts: int | None = None,
        decode_threads: int = 1,
        cache_frames: bool = False,
    ) -> None:
        check_choice("mode", mode, MODES)
        if not records:
            raise ValueError("VideoDataset needs at least one record, got none")
        self.records = list(records)
        self.mode = mode
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None:
            if num_classes is not None and num_classes != len(self.classes):
                raise ValueError(
                    f"num_classes is {num_classes} but the data has {len(self.classes)} class "
                    "names; pass the full class list (classes=) so indices match across splits"
                )
            num_classes = len(self.classes)
        self.num_classes = _check_labels(self.records, num_classes, "VideoDataset")
        if mode == "train":
            self.sampler: RandomClipSampler | UniformClipSampler = RandomClipSampler(
                num_frames, stride, pad=pad
            )
            default = video_train_transform(
                short_side=short_side_range, crop_size=crop_size, flip_p=flip_p, mean=mean, std=std
            )
            self.num_views = 1
        else:
            self.sampler = UniformClipSampler(num_frames, stride, num_clips, pad=pad)
            default = video_test_transform(
                short_side=test_short_side, crop_size=test_crop_size, num_crops=num_crops,
                mean=mean, std=std,
            )  # fmt: skip
            self.num_views = num_clips * num_crops
        self.transform = transform if transform is not None else default
        self.seeder = SampleSeeder(seed)
        self.max_attempts = max_attempts or min(len(self.records), 100)
        self.decode_threads = decode_threads
        self.cache_frames = cache_frames
        self._frame_cache: dict[int, torch.Tensor] = {}
        self.num_loaded = 0
        self.num_skipped = 0
        self.unreadable_paths: list[str] = []

    # constructors ------------------------------------------------------------------------------

    @classmethod
    def from_list_file(
        cls,
        list_file: str | os.PathLike[str],
        *,
        root: str | os.PathLike[str] | None = None,
        num_classes: int | None = None,
        check_files: bool = False,
        **kwargs: Any,
    ) -> VideoDataset:
        """Dataset from a ``<path> <label>`` list file (see :func:`parse_list_file`)."""
        records = parse_list_file(
            list_file, root=root, num_classes=num_classes, check_files=check_files
        )
        return cls(records, num_classes=num_classes, **kwargs)

    @classmethod
    def from_kinetics_csv(
        cls,
        csv_file: str | os.PathLike[str],
        root: str | os.PathLike[str],
        *,
        classes: Sequence[str] | str | os.PathLike[str] | None = None,
        split: str | None = None,
        on_missing: str = "error",
        **kwargs: Any,
    ) -> VideoDataset:
        """Dataset from a Kinetics CSV and a video root (see :func:`parse_kinetics_csv`)."""
        records, names = parse_kinetics_csv(
            csv_file, root, classes=classes, split=split, on_missing=on_missing
        )
        return cls(records, classes=names, **kwargs)

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        *,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        **kwargs: Any,
    ) -> VideoDataset:
        """Dataset from one sub-folder per class (see :func:`scan_class_folders`)."""
        records, names = scan_class_folders(root, extensions=extensions)
        return cls(records, classes=names, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_frame_cache"] = {}  # not shipped to spawned workers
        return state

    # sampling ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    @property
    def seed(self) -> int | None:
        return self.seeder.seed

    @property
    def epoch(self) -> int:
        return self.seeder.epoch

    def set_epoch(self, epoch: int) -> None:
        """Change the random clips and crops of the next epoch (with ``seed`` set)."""
        self.seeder.set_epoch(epoch)

    def load(self, index: int) -> torch.Tensor:
        """Decode and transform video ``index`` (no skipping): ``(C, T, H, W)`` or ``(V, C, T, H, W)``.

        Raises:
            VideoDecodeError: the video cannot be read.
        """
        g = self.seeder.generator(index) if self.mode == "train" else None
        path = self.records[index].path
        if self.cache_frames:
            frames = self._frame_cache.get(index)
            if frames is None:
                with VideoReader(path, threads=self.decode_threads) as reader:
                    frames = reader.get_frames(range(reader.num_frames))  # (N, H, W, 3)
                self._frame_cache[index] = frames
            clips = [frames[clip] for clip in self.sampler(len(frames), g)]
        else:
            clips = read_clips(path, self.sampler, g, threads=self.decode_threads)
        views = []
        for clip in clips:
            x = clip.permute(3, 0, 1, 2)  # (C, T, H, W)
            views.append(self.transform(x, generator=g))
        if self.mode == "train":
            return views[0]
        stacked = torch.stack(
            [v if v.dim() == 5 else v.unsqueeze(0) for v in views]  # each (N, C, T, S, S)
        )  # (K, N, C, T, S, S)
        return stacked.flatten(0, 1)  # (K * N, C, T, S, S): clip-major, crop-minor

    def _read(self, index: int) -> dict[str, Any]:
        video = self.load(index)
        self.num_loaded += 1
        record = self.records[index]
        return {"video": video, "label": record.label, "index": index, "path": record.path}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample dict; an unreadable video is skipped (see :mod:`nonlocalnet.data.samples`)."""
        if not 0 <= index < len(self.records):
            raise IndexError(
                f"index {index} out of range for a dataset of {len(self.records)} videos"
            )
        sample = read_or_skip(
            index, len(self.records), self._read, lambda j: self.records[j].path,
            train=self.mode == "train", input_key="video", errors=(VideoDecodeError,),
            max_attempts=self.max_attempts, what="videos",
        )  # fmt: skip
        self.num_skipped += len(sample["unreadable"])
        self.unreadable_paths += sample["unreadable"]
        return sample


# --- batching and skip accounting -----------------------------------------------------------------


collate_videos = collate_samples


__all__ = [
    "VIDEO_EXTENSIONS",
    "SkipTracker",
    "VideoDataset",
    "VideoDecodeError",
    "VideoReader",
    "VideoRecord",
    "check_skip_fraction",
    "collate_samples",
    "collate_videos",
    "parse_kinetics_csv",
    "parse_list_file",
    "read_class_list",
    "read_clips",
    "scan_class_folders",
]
