"""The built-in long-range benchmark: "same colour across space and time".

Video version
-------------
Each clip has T frames of S×S pixels on a dark background. Two *cue* objects, solid discs in one
of K saturated palette colours, are far apart in space and in time: the *early* cue is visible in
the first ``cue_frames`` frames near one corner, the *late* cue in the last ``cue_frames`` frames
near the diagonally opposite corner. ``num_distractors`` small grey squares appear at random places
in random runs of frames. The label is the relation between the two cues: 1 ("same") when they have
the same colour, 0 ("different") otherwise.

How the data are drawn, so that nothing but the relation carries the label:

- labels are exactly balanced within each split (half of each, in random order);
- the early colour c1 is uniform over the K colours; the late colour c2 is c1 for "same" and
  uniform over the other K-1 colours for "different". Hence c1 and c2 are each uniform *under
  either label*: each colour, on its own, says nothing about the label;
- corner, position jitter, number, size, grey level, place and timing of the distractors and the
  background level are drawn independently of the label (and of the colours);
- the mp4 files are encoded intra-only (every frame a key frame) at a constant quantiser, so
  the decoded pixels of a frame do not depend on the other frames (tested: changing the early
  cue leaves the decoded later frames bit-identical).

Why a C2D network cannot beat chance (in expectation over the data): a C2D processes frames
independently (1×k×k kernels) and mixes time only in pooling windows of a few frames; the
temporal gap T - 2·cue_frames between the cues is longer than those windows, and the cues are
never in the same frame. So every position of the last feature map sees at most one cue, and
global average pooling gives a feature that is a *sum* of terms, each depending on one cue:

    h = h_0 + F(c1, early position) + F(c2, late position) + (distractor and background terms),

and a linear head gives a logit difference g(c1, ·) + g(c2, ·) + b, additive in the two colours.
"Same colour" is XOR-like in (c1, c2) and no additive function computes it. More precisely:
(i) since c1 and c2 are each uniform under both labels, an additive score has the same mean under
both labels; (ii) the cross-entropy of ``softmax(g(c1) + g(c2) + b)`` is *convex* in g (the logit is
linear in g) and the data are invariant to permuting the colours, so the averaged, colour-blind g
is a minimiser: the best a C2D can reach in cross-entropy is log 2, that of the constant 50/50
guess. (iii) On the 0/1 scale an additive score can still be right more often than not: "both cues in
a fixed half of the palette" is right (1/2 + 1 - h(h-1)/(K(K-1)))/2 of the time for h = K/2,
65% for K = 6 and 64.3% for K = 8 (the best threshold on an additive score symmetric in the two
cues). It costs cross-entropy, so training has no pull towards it, and it needs colour features
that break the palette symmetry. What a C2D *can* do is memorise its training clips (positions, distractors), which does
not carry over to held-out clips. A space-time non-local block lets the feature at the late cue
attend to the early cue (its weights f(x_i, x_j) depend on both features, e.g. on their colours),
so one block suffices to relate them; a C2D with such a block is no longer additive over the two
cues. (In the demo, the late cue's query puts ~10× the uniform share of its attention on the early
cue; see ``benchmarks/RESULTS.md (section 5)``.)

Image version
-------------
Same idea in one image: two discs in diagonally opposite corners among grey distractors; label =
same/different colour. For a 2D CNN with global average pooling, the same argument holds *only*
while no unit's receptive field covers both discs: a shallow network (or one pooled early) then
cannot beat chance, and a NonLocal2d block can relate the discs. A deep 2D CNN's receptive field
(hundreds of pixels for ResNet-50) covers the whole small image, so a deep enough plain CNN *can*
learn the task; the image version shows that non-local blocks relate distant positions with a
shallow network, not that deep CNNs cannot. It is a generator only (PNG files, one folder per
class), used by the image-model tests, not by the demo.

Files on disk
-------------
``generate_video_dataset(root, spec)`` writes ``root/<key>/`` with ``videos/{train,val}/*.mp4``,
list files ``train.txt`` / ``val.txt`` of ``<path> <label>`` lines (paths relative to the list
file's folder), ``classes.txt``, ``metadata.json`` (per-clip colours, corners, positions, ...) and
``spec.json``. ``<key>`` is a hash of the generator parameters and seed, so a second call with the
same spec reuses the files (``metadata.json`` is written last, as the completion marker).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CLASSES",
    "PALETTE",
    "SyntheticImageSpec",
    "SyntheticVideoSpec",
    "disc_mask",
    "finish_folder",
    "generate_image_dataset",
    "generate_video_dataset",
    "make_image_sample",
    "make_video_sample",
    "prepare_folder",
    "read_video_metadata",
    "sample_rng",
    "spec_key",
    "split_labels",
    "write_mp4",
]

log = logging.getLogger(__name__)

#: class index -> name; label 1 means the two cues have the same colour.
CLASSES = ("different", "same")

#: saturated colours, far apart in RGB and in the chroma planes of YUV 4:2:0.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 30, 30),  # red
    (30, 200, 40),  # green
    (40, 70, 240),  # blue
    (240, 220, 30),  # yellow
    (220, 40, 220),  # magenta
    (30, 220, 230),  # cyan
    (250, 140, 20),  # orange
    (150, 60, 240),  # violet
)

# corners: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; 3 - q is opposite to q.
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (is_bottom, is_right)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

#: x264 settings: every frame a key frame (g=1, no B-frames) at a constant quantiser (qp, so no
#: rate control carries the complexity of one frame over to the next): each frame is coded on
#: its own. Part of the cache key.
_X264_OPTIONS = {"qp": "12", "g": "1", "bf": "0", "preset": "veryfast"}


@dataclass(frozen=True)
class SyntheticVideoSpec:
    """Parameters of the video benchmark (all of them enter the cache key).

    Attributes:
        num_train: training clips (even).
        num_val: held-out clips (even).
        frames: frames per clip T.
        size: frame height and width S in pixels.
        num_colours: K palette colours used (2..len(PALETTE)).
        radius: cue disc radius in pixels.
        cue_frames: frames each cue is visible (the early one in the first, the late one in the
            last); the gap T - 2·cue_frames must exceed the C2D's temporal pooling windows.
        margin: distance in pixels from the frame border to the nearest cue centre.
        jitter: the cue centre moves up to this many pixels further from the border.
        num_distractors: grey squares per clip (fixed, so the count carries no label).
        distractor_size: side of a distractor square in pixels.
        fps: frame rate written into the mp4 files.
        seed: seed of everything.
    """

    num_train: int = 1536
    num_val: int = 512
    frames: int = 8
    size: int = 32
    num_colours: int = 6
    radius: int = 5
    cue_frames: int = 2
    margin: int = 7
    jitter: int = 3
    num_distractors: int = 3
    distractor_size: int = 4
    fps: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_common(self.num_train, self.num_val, self.num_colours, self.size, self.radius)
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        if not 1 <= self.cue_frames <= self.frames // 2:
            raise ValueError(
                f"cue_frames must lie in [1, frames // 2 = {self.frames // 2}], got {self.cue_frames}"
            )
        _check_geometry(self.size, self.radius, self.margin, self.jitter, self.distractor_size)
        if self.num_distractors < 0 or self.fps < 1:
            raise ValueError(
                f"num_distractors must be >= 0 and fps >= 1, got {self.num_distractors}, {self.fps}"
            )

    def key(self) -> str:
        """Short hash of all parameters: the cache folder name."""
        return spec_key("video", self)


@dataclass(frozen=True)
class SyntheticImageSpec:
    """Parameters of the image benchmark; see :class:`SyntheticVideoSpec` for the shared fields."""

    num_train: int = 1536
    num_val: int = 512
    size: int = 32
    num_colours: int = 6
    radius: int = 5
    margin: int = 7
    jitter: int = 3
    num_distractors: int = 3
    distractor_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        _check_common(self.num_train, self.num_val, self.num_colours, self.size, self.radius)
        _check_geometry(self.size, self.radius, self.margin, self.jitter, self.distractor_size)
        if self.num_distractors < 0:
            raise ValueError(f"num_distractors must be >= 0, got {self.num_distractors}")

    def key(self) -> str:
        """Short hash of all parameters: the cache folder name."""
        return spec_key("image", self)


def _check_common(num_train: int, num_val: int, num_colours: int, size: int, radius: int) -> None:
    for name, n in (("num_train", num_train), ("num_val", num_val)):
        if n < 2 or n % 2:
            raise ValueError(f"{name} must be an even number >= 2 (balanced labels), got {n}")
    if not 2 <= num_colours <= len(PALETTE):
        raise ValueError(f"num_colours must lie in [2, {len(PALETTE)}], got {num_colours}")
    if size < 8 or radius < 1:
        raise ValueError(f"size must be >= 8 and radius >= 1, got size={size}, radius={radius}")


def _check_geometry(size: int, radius: int, margin: int, jitter: int, distractor: int) -> None:
    if margin < radius or jitter < 0:
        raise ValueError(
            f"margin must be >= radius ({radius}) and jitter >= 0, got margin={margin}, "
            f"jitter={jitter}"
        )
    if 2 * (margin + jitter + radius) >= size:
        raise ValueError(
            f"the cues of opposite corners overlap: need 2·(margin + jitter + radius) < size, got "
            f"2·({margin} + {jitter} + {radius}) >= {size}"
        )
    if not 1 <= distractor < size:
        raise ValueError(f"distractor_size must lie in [1, {size}), got {distractor}")


def spec_key(kind: str, spec: Any) -> str:
    """``<kind>-<hash>``: a short hash of a spec dataclass's fields (the cache folder name of
    every generated set; the video set's also hashes the encoder settings)."""
    fields = {"kind": kind, **dataclasses.asdict(spec)}
    if kind == "video":
        fields["x264"] = _X264_OPTIONS
    blob = json.dumps(fields, sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One generator per sample (clip or image): samples are reproducible one by one, in any
    order."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def split_labels(seed: int, split: str, n: int) -> np.ndarray:
    """Exactly n/2 of each label, in a seeded random order."""
    labels = np.repeat(np.arange(2), n // 2)  # (n,)
    return np.random.default_rng([seed, _SPLIT_IDS[split], 1 << 20]).permutation(labels)


def _draw_colours(rng: np.random.Generator, label: int, k: int) -> tuple[int, int]:
    c1 = int(rng.integers(k))
    if label == 1:
        return c1, c1
    c2 = int(rng.integers(k - 1))
    return c1, c2 + (c2 >= c1)  # uniform over the other k - 1 colours


def _cue_centre(
    rng: np.random.Generator, corner: int, size: int, margin: int, jitter: int
) -> tuple[int, int]:
    is_bottom, is_right = _CORNERS[corner]
    y, x = (margin + int(rng.integers(jitter + 1)) for _ in range(2))
    return (size - 1 - y if is_bottom else y), (size - 1 - x if is_right else x)


def disc_mask(
    size: int | tuple[int, int], centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Boolean mask ``(H, W)`` of the pixels within ``radius`` of ``centre`` ``(y, x)``; ``size``
    is ``S`` (a square) or ``(H, W)``."""
    height, width = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[:height, :width]  # (H, W) each
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _draw_distractors(
    rng: np.random.Generator, n: int, size: int, side: int, frames: int
) -> list[dict[str, int]]:
    out = []
    for _ in range(n):
        start = int(rng.integers(frames))
        out.append(
            {
                "y": int(rng.integers(size - side + 1)),
                "x": int(rng.integers(size - side + 1)),
                "grey": int(rng.integers(90, 200)),
                "start": start,
                "stop": start + 1 + int(rng.integers(max(1, frames - start))),
            }
        )
    return out


def make_video_sample(
    spec: SyntheticVideoSpec, label: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one clip.

    Args:
        spec: generator parameters.
        label: 1 for "same colour", 0 for "different".
        rng: the clip's random generator.

    Returns:
        ``(frames, meta)``: uint8 frames ``(T, S, S, 3)`` and the clip's drawn parameters.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    t, s = spec.frames, spec.size
    c1, c2 = _draw_colours(rng, label, spec.num_colours)
    corner = int(rng.integers(4))
    early = _cue_centre(rng, corner, s, spec.margin, spec.jitter)
    late = _cue_centre(rng, 3 - corner, s, spec.margin, spec.jitter)
    background = int(rng.integers(0, 40))
    distractors = _draw_distractors(rng, spec.num_distractors, s, spec.distractor_size, t)

    video = np.full((t, s, s, 3), background, dtype=np.uint8)  # (T, H, W, 3)
    for d in distractors:
        ds = spec.distractor_size
        video[d["start"] : d["stop"], d["y"] : d["y"] + ds, d["x"] : d["x"] + ds] = d["grey"]
    video[: spec.cue_frames, disc_mask(s, early, spec.radius)] = PALETTE[c1]
    video[t - spec.cue_frames :, disc_mask(s, late, spec.radius)] = PALETTE[c2]
    meta = {
        "label": label,
        "colours": [c1, c2],
        "corners": [corner, 3 - corner],
        "centres": [list(early), list(late)],
        "background": background,
        "distractors": distractors,
    }
    return video, meta


def make_image_sample(
    spec: SyntheticImageSpec, label: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one image: two discs in opposite corners among grey squares.

    Returns:
        ``(image, meta)``: uint8 ``(S, S, 3)`` and the image's drawn parameters.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    s = spec.size
    c1, c2 = _draw_colours(rng, label, spec.num_colours)
    corner = int(rng.integers(4))
    first = _cue_centre(rng, corner, s, spec.margin, spec.jitter)
    second = _cue_centre(rng, 3 - corner, s, spec.margin, spec.jitter)
    background = int(rng.integers(0, 40))
    distractors = _draw_distractors(rng, spec.num_distractors, s, spec.distractor_size, 1)
    image = np.full((s, s, 3), background, dtype=np.uint8)  # (H, W, 3)
    for d in distractors:
        ds = spec.distractor_size
        image[d["y"] : d["y"] + ds, d["x"] : d["x"] + ds] = d["grey"]
    image[disc_mask(s, first, spec.radius)] = PALETTE[c1]
    image[disc_mask(s, second, spec.radius)] = PALETTE[c2]
    meta = {
        "label": label,
        "colours": [c1, c2],
        "corners": [corner, 3 - corner],
        "centres": [list(first), list(second)],
        "background": background,
        "distractors": distractors,
    }
    return image, meta


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 8) -> None:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` as an intra-only H.264 mp4 (yuv420p).

    Every frame is a key frame coded at a constant quantiser (``g=1``, ``qp=12``), so no frame is
    predicted from another and no rate control links them: the codec cannot carry information
    across frames. H and W must be even (4:2:0 chroma).
    """
    import av  # optional dependency (extra "video")

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be a uint8 (T, H, W, 3) array, got {frames.dtype} {frames.shape}"
        )
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H and W must be even for yuv420p, got {frames.shape[1:3]}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_X264_OPTIONS)
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def prepare_folder(root: str | os.PathLike[str], key: str, overwrite: bool) -> tuple[Path, bool]:
    """``(root/key, cached)``: cached when a complete copy is there (its ``metadata.json``,
    written last) and not ``overwrite``; otherwise the folder is emptied and created."""
    out = Path(root) / key
    if (out / "metadata.json").is_file() and not overwrite:
        log.info("synthetic data cached at %s", out)
        return out, True
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out, False


def finish_folder(
    out: Path,
    spec: Any,
    metadata: dict[str, list[dict[str, Any]]],
    classes: Sequence[str] | None = CLASSES,
) -> None:
    """Write ``classes.txt`` (unless ``classes`` is None), ``spec.json`` and, last, as the
    completion marker, ``metadata.json``."""
    if classes is not None:
        (out / "classes.txt").write_text("\n".join(classes) + "\n")
    (out / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1) + "\n")
    tmp = out / "metadata.json.tmp"
    tmp.write_text(json.dumps(metadata))
    tmp.replace(out / "metadata.json")  # last: marks the folder complete


def generate_video_dataset(
    root: str | os.PathLike[str], spec: SyntheticVideoSpec | None = None, *, overwrite: bool = False
) -> Path:
    """Write (or reuse) the video benchmark under ``root/<spec.key()>``.

    Args:
        root: cache folder.
        spec: generator parameters (defaults: :class:`SyntheticVideoSpec`).
        overwrite: regenerate even when a complete copy exists.

    Returns:
        The data folder, holding ``train.txt``, ``val.txt``, ``classes.txt``, ``spec.json``,
        ``metadata.json`` and ``videos/``.
    """
    spec = spec or SyntheticVideoSpec()
    out, cached = prepare_folder(root, spec.key(), overwrite)
    if cached:
        return out
    metadata: dict[str, list[dict[str, Any]]] = {}
    for split, n in (("train", spec.num_train), ("val", spec.num_val)):
        (out / "videos" / split).mkdir(parents=True)
        lines, metas = [], []
        for i, label in enumerate(split_labels(spec.seed, split, n)):
            frames, meta = make_video_sample(spec, int(label), sample_rng(spec.seed, split, i))
            rel = f"videos/{split}/{i:05d}.mp4"
            write_mp4(out / rel, frames, spec.fps)
            lines.append(f"{rel} {int(label)}")
            metas.append({"path": rel, **meta})
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
        metadata[split] = metas
    finish_folder(out, spec, metadata)
    log.info("wrote %d + %d synthetic clips to %s", spec.num_train, spec.num_val, out)
    return out


def generate_image_dataset(
    root: str | os.PathLike[str], spec: SyntheticImageSpec | None = None, *, overwrite: bool = False
) -> Path:
    """Write (or reuse) the image benchmark under ``root/<spec.key()>``.

    Layout: ``{train,val}/<class name>/<index>.png`` (one folder per class), plus
    ``classes.txt``, ``spec.json`` and ``metadata.json``.
    """
    from PIL import Image

    spec = spec or SyntheticImageSpec()
    out, cached = prepare_folder(root, spec.key(), overwrite)
    if cached:
        return out
    metadata: dict[str, list[dict[str, Any]]] = {}
    for split, n in (("train", spec.num_train), ("val", spec.num_val)):
        for name in CLASSES:
            (out / split / name).mkdir(parents=True)
        metas = []
        for i, label in enumerate(split_labels(spec.seed, split, n)):
            image, meta = make_image_sample(spec, int(label), sample_rng(spec.seed, split, i))
            rel = f"{split}/{CLASSES[int(label)]}/{i:05d}.png"
            Image.fromarray(image).save(out / rel)
            metas.append({"path": rel, **meta})
        metadata[split] = metas
    finish_folder(out, spec, metadata)
    return out


def read_video_metadata(folder: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The per-clip metadata of a generated folder: ``{"train": [...], "val": [...]}``."""
    path = Path(folder) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metadata.json in {folder}: not a complete generated data set")
    return json.loads(path.read_text())
