"""The built-in long-range benchmark: determinism, balance, label independence, decoding."""

from __future__ import annotations

import dataclasses
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nonlocalnet.data.synthetic import (
    CLASSES,
    PALETTE,
    SyntheticImageSpec,
    SyntheticVideoSpec,
    generate_image_dataset,
    generate_video_dataset,
    make_image_sample,
    make_video_sample,
    read_video_metadata,
    sample_rng,
    split_labels,
)

TINY = SyntheticVideoSpec(num_train=8, num_val=4, seed=3)


def _metas(spec: SyntheticVideoSpec, n: int) -> list[dict]:
    labels = split_labels(spec.seed, "train", n)
    return [
        make_video_sample(spec, int(y), sample_rng(spec.seed, "train", i))[1]
        for i, y in enumerate(labels)
    ]


@pytest.fixture(scope="module")
def metas() -> list[dict]:
    return _metas(SyntheticVideoSpec(num_train=4000, seed=11), 4000)


@pytest.fixture(scope="module")
def tiny_video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("av")
    return generate_video_dataset(tmp_path_factory.mktemp("syn"), TINY)


def test_sample_pixels_put_the_cues_in_opposite_corners_at_both_ends() -> None:
    spec = SyntheticVideoSpec(num_distractors=0)
    video, meta = make_video_sample(spec, 0, np.random.default_rng(5))
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    (y1, x1), (y2, x2) = meta["centres"]
    c1, c2 = meta["colours"]
    assert c1 != c2 and meta["corners"][0] + meta["corners"][1] == 3
    assert abs(y1 - y2) >= 10 and abs(x1 - x2) >= 10  # opposite corners
    bg = [meta["background"]] * 3
    for t in range(8):
        early = PALETTE[c1] if t < spec.cue_frames else bg
        late = PALETTE[c2] if t >= 8 - spec.cue_frames else bg
        assert video[t, y1, x1].tolist() == list(early)
        assert video[t, y2, x2].tolist() == list(late)
    # frames between the cues are pure background
    assert (video[spec.cue_frames : 8 - spec.cue_frames] == meta["background"]).all()


def test_same_label_means_same_colour(metas: list[dict]) -> None:
    for m in metas:
        c1, c2 = m["colours"]
        assert (c1 == c2) == (m["label"] == 1)


def test_labels_exactly_balanced_per_split() -> None:
    for split in ("train", "val"):
        labels = split_labels(0, split, 1000)
        assert labels.sum() == 500 and len(labels) == 1000
    assert not np.array_equal(split_labels(0, "train", 100), split_labels(0, "val", 100))


def _max_tv(counts: dict[int, np.ndarray]) -> float:
    """Largest total-variation distance between the label-conditional distributions."""
    p0, p1 = (counts[y] / counts[y].sum() for y in (0, 1))
    return 0.5 * float(np.abs(p0 - p1).sum())


def test_nothing_but_the_relation_depends_on_the_label(metas: list[dict]) -> None:
    k = 6
    labels = np.array([m["label"] for m in metas])

    def conditional(values: np.ndarray, bins: int) -> dict[int, np.ndarray]:
        return {y: np.bincount(values[labels == y], minlength=bins) for y in (0, 1)}

    c = np.array([m["colours"] for m in metas])  # (n, 2)
    # each cue's colour is uniform under either label (2000 draws each: sd of a frequency ~0.008)
    for slot in (0, 1):
        for y in (0, 1):
            freq = np.bincount(c[labels == y, slot], minlength=k) / (labels == y).sum()
            assert np.abs(freq - 1 / k).max() < 0.04, (slot, y, freq)
    corners = np.array([m["corners"][0] for m in metas])
    assert _max_tv(conditional(corners, 4)) < 0.05
    centres = np.array([m["centres"] for m in metas])  # (n, 2, 2)
    jitter = (np.minimum(centres, 31 - centres) - 7).reshape(len(metas), 4)  # (n, 4) in [0, 3]
    for j in range(4):
        assert _max_tv(conditional(jitter[:, j], 4)) < 0.05
    background = np.array([m["background"] // 8 for m in metas])
    assert _max_tv(conditional(background, 5)) < 0.06
    d = [x for m in metas for x in m["distractors"]]
    d_labels = np.repeat(labels, 3)
    for key, scale, bins in (("y", 4, 8), ("x", 4, 8), ("grey", 20, 10), ("start", 1, 8)):
        values = np.array([x[key] // scale for x in d])
        counts = {y: np.bincount(values[d_labels == y], minlength=bins) for y in (0, 1)}
        assert _max_tv(counts) < 0.05, key
    assert all(len(m["distractors"]) == 3 for m in metas)


def _fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, steps: int = 300
) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(features.shape[1], 2)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(features), labels) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def test_additive_colour_features_are_at_chance_pair_features_are_not(metas: list[dict]) -> None:
    """The C2D argument on the metadata: a linear head on onehot(c1) + onehot(c2) (what global
    pooling of frame-local features gives) learns nothing (held-out cross-entropy stays at
    log 2, the 50/50 guess); one on the pair onehot(c1, c2) (what relating the cues gives) solves
    the task."""
    k = 6
    c = torch.tensor([m["colours"] for m in metas])  # (n, 2)
    y = torch.tensor([m["label"] for m in metas])
    train, test = slice(0, 3000), slice(3000, None)
    additive = F.one_hot(c[:, 0], k).float() + F.one_hot(c[:, 1], k).float()  # (n, K)
    pair = F.one_hot(c[:, 0] * k + c[:, 1], k * k).float()  # (n, K²)
    results = []
    for features in (additive, pair):
        head = _fit_logistic(features[train], y[train])
        with torch.no_grad():
            logits = head(features[test])
        results.append(
            (
                F.cross_entropy(logits, y[test]).item(),
                (logits.argmax(1) == y[test]).float().mean().item(),
            )
        )
    (ce_add, acc_add), (ce_pair, acc_pair) = results
    assert ce_add > np.log(2) - 0.005, results
    assert 0.3 < acc_add < 0.7, results  # a near-constant score: its argmax is noise
    assert ce_pair < 0.05 and acc_pair > 0.999, results


def test_best_additive_threshold_matches_the_docstring_bound() -> None:
    """Brute force over the palette halves H: 'both cues in H' is right 65% of the time (K=6),
    and no subset does better, as the module docstring says."""
    k = 6
    best = 0.0
    for h in range(1, k):
        for subset in combinations(range(k), h):
            s = set(subset)
            same_right = len(s) / k
            both = sum(1 for a in range(k) for b in range(k) if a != b and a in s and b in s)
            diff_right = 1 - both / (k * (k - 1))
            best = max(best, (same_right + diff_right) / 2)
    assert best == pytest.approx(0.65)


@pytest.mark.video_io
def test_generation_is_deterministic_and_cached(tmp_path: Path, tiny_video_dir: Path) -> None:
    again = generate_video_dataset(tmp_path, TINY)
    assert again.name == tiny_video_dir.name == TINY.key()
    for name in ("train.txt", "val.txt", "metadata.json", "classes.txt"):
        assert (again / name).read_text() == (tiny_video_dir / name).read_text()
    import av

    for line in (again / "train.txt").read_text().split("\n")[:3]:
        rel = line.split()[0]
        decoded = []
        for root in (again, tiny_video_dir):
            with av.open(str(root / rel)) as container:
                decoded.append(
                    np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
                )
        assert np.array_equal(decoded[0], decoded[1])
    # a second call reuses the files; a different seed gives other data under another key
    mtime = (again / "metadata.json").stat().st_mtime_ns
    assert generate_video_dataset(tmp_path, TINY) == again
    assert (again / "metadata.json").stat().st_mtime_ns == mtime
    other = dataclasses.replace(TINY, seed=4)
    assert other.key() != TINY.key()
    meta_a = read_video_metadata(again)["train"]
    meta_b = [
        make_video_sample(other, int(y), sample_rng(4, "train", i))[1]
        for i, y in enumerate(split_labels(4, "train", 8))
    ]
    assert [m["colours"] for m in meta_a] != [m["colours"] for m in meta_b]


@pytest.mark.video_io
def test_list_files_and_decoding_through_the_data_package(tiny_video_dir: Path) -> None:
    from nonlocalnet.data import VideoDataset

    lines = (tiny_video_dir / "train.txt").read_text().split()
    labels = [int(x) for x in lines[1::2]]
    assert len(labels) == 8 and sum(labels) == 4
    assert (tiny_video_dir / "classes.txt").read_text().split() == list(CLASSES)
    meta = read_video_metadata(tiny_video_dir)
    ds = VideoDataset.from_list_file(
        tiny_video_dir / "train.txt",
        num_classes=2,
        mode="test",
        num_frames=8,
        stride=1,
        num_clips=1,
        num_crops=1,
        test_short_side=32,
        test_crop_size=32,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    assert len(ds) == 8
    for i in range(len(ds)):
        sample = ds[i]
        m = meta["train"][i]
        assert sample["label"] == m["label"] == labels[i]
        video = sample["video"]  # (1, 3, T, H, W)
        assert video.shape == (1, 3, 8, 32, 32)
        (y1, x1), (y2, x2) = m["centres"]
        got_early = video[0, :, 0, y1, x1] * 255
        got_late = video[0, :, -1, y2, x2] * 255
        want_early = torch.tensor(PALETTE[m["colours"][0]], dtype=torch.float32)
        want_late = torch.tensor(PALETTE[m["colours"][1]], dtype=torch.float32)
        # lossy H.264 + 4:2:0 chroma: the disc centre keeps its colour within a few levels
        assert (got_early - want_early).abs().max() < 30
        assert (got_late - want_late).abs().max() < 30
        # and the middle frames do not show the early cue
        assert (video[0, :, 4, y1, x1] * 255 - m["background"]).abs().max() < 30


@pytest.mark.video_io
def test_codec_carries_nothing_across_frames(tmp_path: Path) -> None:
    """Changing the early cue's colour leaves every later decoded frame bit-identical."""
    av = pytest.importorskip("av")
    from nonlocalnet.data.synthetic import write_mp4

    spec = SyntheticVideoSpec()
    video, meta = make_video_sample(spec, 1, np.random.default_rng(7))
    other = video.copy()
    c1 = meta["colours"][0]
    mask = (video[:2] == np.array(PALETTE[c1], dtype=np.uint8)).all(-1)  # (2, H, W) early cue
    other[:2][mask] = PALETTE[(c1 + 1) % spec.num_colours]
    decoded = []
    for i, frames in enumerate((video, other)):
        write_mp4(tmp_path / f"{i}.mp4", frames)
        with av.open(str(tmp_path / f"{i}.mp4")) as container:
            decoded.append(
                np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            )
    assert not np.array_equal(decoded[0][:2], decoded[1][:2])  # the early frames differ
    assert np.array_equal(decoded[0][2:], decoded[1][2:])  # the rest is untouched


def test_image_version(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    spec = SyntheticImageSpec(num_train=6, num_val=4, seed=2)
    root = generate_image_dataset(tmp_path, spec)
    meta = json.loads((root / "metadata.json").read_text())
    for split, n in (("train", 6), ("val", 4)):
        files = {name: sorted((root / split / name).glob("*.png")) for name in CLASSES}
        assert len(files["same"]) == len(files["different"]) == n // 2
        for m in meta[split]:
            image = np.asarray(Image.open(root / m["path"]).convert("RGB"))
            assert image.shape == (32, 32, 3)
            assert m["path"].split("/")[1] == CLASSES[m["label"]]
            for (y, x), colour in zip(m["centres"], m["colours"], strict=True):
                assert image[y, x].tolist() == list(PALETTE[colour])  # PNG is lossless
    image, m = make_image_sample(spec, 1, np.random.default_rng(0))
    assert m["colours"][0] == m["colours"][1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_train": 7}, "num_train must be an even"),
        ({"num_colours": 1}, "num_colours must lie in"),
        ({"cue_frames": 5}, "cue_frames must lie in"),
        ({"margin": 12}, "cues of opposite corners overlap"),
        ({"margin": 3}, "margin must be >= radius"),
    ],
)
def test_bad_specs_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticVideoSpec(**kwargs)


def test_bad_label_is_rejected() -> None:
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        make_video_sample(SyntheticVideoSpec(), 2, np.random.default_rng(0))
