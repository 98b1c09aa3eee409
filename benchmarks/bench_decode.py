"""Video decoding throughput of the data pipeline (PyAV decode + clip sampling + transforms).

Writes small H.264 mp4 files into a temporary folder, then measures clips per second:

- ``decode``: :func:`nonlocalnet.data.video.read_clips` alone (open, seek, decode, RGB), one process;
- ``dataset wN``: a ``DataLoader`` over :class:`VideoDataset` in train mode (decode + short-side
  jitter + random crop + flip + normalise + collate) with N worker processes (0 = main process);
- ``cached w0``: the same in the main process with ``cache_frames=True``, after a first epoch
  filled the cache (sampling + transforms only: the cost left once decoding is gone).

Usage::

    python benchmarks/bench_decode.py                 # the default video shapes, workers 0 1 2
    python benchmarks/bench_decode.py --videos 64 --workers 0 2 --repeats 3

Prints a markdown table. Timings depend on the load of the machine: run it on an idle one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader

from nonlocalnet.data import RandomClipSampler, VideoDataset, collate_samples, read_clips


@dataclass(frozen=True)
class Shape:
    """One video shape and the clip read from it."""

    name: str
    frames: int
    size: int
    clip_frames: int
    stride: int
    options: tuple[tuple[str, str], ...]

    @property
    def encoder_options(self) -> dict[str, str]:
        return dict(self.options)


SHAPES = (
    # the demo's data (nonlocalnet.data.synthetic: 8 frames 32x32, every frame a key frame)
    Shape("demo 8x32x32 (g=1)", 8, 32, 8, 1, (("crf", "12"), ("g", "1"), ("bf", "0"))),
    Shape("16x64x64", 16, 64, 8, 2, (("crf", "18"),)),
    Shape("32x112x112", 32, 112, 16, 2, (("crf", "18"),)),
)


def write_video(path: Path, shape: Shape, rng: np.random.Generator) -> None:
    """Moving random blobs, so the encoder has real work (not a flat frame)."""
    base = rng.integers(0, 256, (shape.size // 8 + 1, shape.size // 8 + 1, 3), dtype=np.uint8)
    base = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[: shape.size, : shape.size]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = shape.size
        stream.pix_fmt = "yuv420p"
        stream.options = shape.encoder_options
        for t in range(shape.frames):
            frame = np.roll(base, shift=t, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bench_decode(paths: list[Path], shape: Shape, repeats: int) -> float:
    sampler = RandomClipSampler(shape.clip_frames, shape.stride)
    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            read_clips(p, sampler, g)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def bench_dataset(
    list_file: Path, shape: Shape, workers: int, repeats: int, batch: int, *, cache: bool = False
) -> float:
    short = shape.size
    ds = VideoDataset.from_list_file(
        list_file,
        num_frames=shape.clip_frames,
        stride=shape.stride,
        short_side_range=(short, short + short // 8),
        crop_size=short,
        seed=0,
        cache_frames=cache,
    )
    loader = DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_samples,
        persistent_workers=workers > 0,
    )
    best = float("inf")
    warmup = 1 if workers or cache else 0  # one epoch starts the workers / fills the cache
    for epoch in range(repeats + warmup):
        ds.set_epoch(epoch)
        start = time.perf_counter()
        n = sum(b["video"].shape[0] for b in loader)
        elapsed = time.perf_counter() - start
        if epoch < warmup:
            continue
        best = min(best, elapsed)
    assert n == len(ds)
    return len(ds) / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=48, help="videos per shape")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    columns = ["decode"] + [f"dataset w{w}" for w in args.workers] + ["cached w0"]
    print(f"| video (T x H x W) | clip T x s | {' | '.join(columns)} |")
    print("|" + "---|" * (2 + len(columns)))
    with tempfile.TemporaryDirectory() as tmp:
        for k, shape in enumerate(SHAPES):
            folder = Path(tmp) / f"shape{k}"
            folder.mkdir()
            paths = [folder / f"{i:04d}.mp4" for i in range(args.videos)]
            for p in paths:
                write_video(p, shape, rng)
            list_file = folder / "list.txt"
            list_file.write_text("".join(f"{p.name} 0\n" for p in paths))
            rates = [bench_decode(paths, shape, args.repeats)]
            rates += [
                bench_dataset(list_file, shape, w, args.repeats, args.batch) for w in args.workers
            ]
            rates.append(bench_dataset(list_file, shape, 0, args.repeats, args.batch, cache=True))
            cells = " | ".join(f"{r:.0f}" for r in rates)
            print(f"| {shape.name} | {shape.clip_frames}x{shape.stride} | {cells} |", flush=True)
    print("\nclips/s (best of the passes); torch threads = 1 per process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
