"""Video data: list / Kinetics CSV / folder parsing, PyAV decoding, samplers, skipping, workers.

Test videos encode the frame index in the pixel intensity (frame i is uniform grey 10 + 12 i, H.264
with crf 0), so a decoded frame's mean intensity tells which frame it is.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import nonlocalnet.data.video as video_module
from nonlocalnet.data import (
    RandomClipSampler,
    SkipTracker,
    UniformClipSampler,
    VideoDataset,
    VideoReader,
    check_skip_fraction,
    clip_indices,
    collate_videos,
    parse_kinetics_csv,
    parse_list_file,
    read_clips,
    scan_class_folders,
)

STEP, BASE = 12, 10


def write_video(
    path: Path, num_frames: int = 20, h: int = 48, w: int = 64, *, codec: str = "libx264",
    gop: int = 4, fps: int = 25, fmt: str | None = None,
) -> Path:  # fmt: skip
    """Frame i is uniform grey BASE + STEP * i (needs num_frames <= 20)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "0"}
        for i in range(num_frames):
            rgb = np.full((h, w, 3), BASE + STEP * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Frame indices of uint8 (T, H, W, 3) frames from their mean intensity."""
    means = frames.float().mean(dim=(1, 2, 3))
    ids = ((means - BASE) / STEP).round()
    assert torch.allclose(means, BASE + STEP * ids, atol=3), means
    return ids.long().tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a.mp4", 20)
    write_video(root / "b.mp4", 10)
    write_video(root / "c.webm", 20, codec="libvpx-vp9")  # no frame count in the stream
    write_video(root / "d.avi", 20)  # timestamps start at 1, not 0
    write_video(root / "e.h264", 20, fmt="h264")  # raw stream: no metadata, decoded in full
    (root / "garbage.mp4").write_bytes(b"not a video at all " * 100)
    data = (root / "a.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return root


def write_list(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- list file parsing ----------------------------------------------------------------------------


def test_list_file_parses_comments_blanks_spaces_and_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "x.mp4"
    lst = write_list(
        tmp_path / "train.txt",
        f"# header comment\n\nvids/a.mp4 0\n  my video.mp4   2 \n{absolute} 1\n",
    )
    records = parse_list_file(lst)
    assert [(r.path, r.label) for r in records] == [
        (str(tmp_path / "vids" / "a.mp4"), 0),
        (str(tmp_path / "my video.mp4"), 2),
        (str(absolute), 1),
    ]
    assert records[1].source == f"{lst}:4"
    root = tmp_path / "root"
    root.mkdir()
    assert parse_list_file(lst, root=root)[0].path == str(root / "vids" / "a.mp4")


@pytest.mark.parametrize(
    ("text", "lineno", "words"),
    [
        ("a.mp4 0\nb.mp4\n", 2, "expected '<path> <label>'"),
        ("a.mp4 0\n\n# c\nb.mp4 cat\n", 4, "label must be an integer"),
        ("a.mp4 -1\n", 1, "label must be >= 0"),
    ],
)
def test_list_file_malformed_line_names_file_and_line(
    tmp_path: Path, text: str, lineno: int, words: str
) -> None:
    lst = write_list(tmp_path / "bad.txt", text)
    with pytest.raises(ValueError, match=rf"bad\.txt:{lineno}: .*{words}"):
        parse_list_file(lst)


def test_list_file_label_out_of_range_names_line(tmp_path: Path) -> None:
    lst = write_list(tmp_path / "l.txt", "a.mp4 0\nb.mp4 4\nc.mp4 5\n")
    with pytest.raises(ValueError, match=r"l\.txt:3: label 5 out of range \[0, 5\)"):
        parse_list_file(lst, num_classes=5)
    assert len(parse_list_file(lst, num_classes=6)) == 3
    with pytest.raises(ValueError, match=r"l\.txt:2: label 4 out of range \[0, 3\)"):
        VideoDataset.from_list_file(lst, num_classes=3)


def test_list_file_empty_missing_root_missing_file(tmp_path: Path) -> None:
    empty = write_list(tmp_path / "empty.txt", "# nothing\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt has no entries"):
        parse_list_file(empty)
    with pytest.raises(FileNotFoundError, match=r"video list file not found: .*nope\.txt"):
        parse_list_file(tmp_path / "nope.txt")
    lst = write_list(tmp_path / "l.txt", "a.mp4 0\n")
    with pytest.raises(FileNotFoundError, match=r"data root not found .*no_root"):
        parse_list_file(lst, root=tmp_path / "no_root")
    with pytest.raises(FileNotFoundError, match=r"l\.txt:1: video file not found: .*a\.mp4"):
        parse_list_file(lst, check_files=True)


# --- Kinetics CSV ---------------------------------------------------------------------------------

CSV_HEADER = "label,youtube_id,time_start,time_end,split\n"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_kinetics_csv_layouts_and_sorted_classes(tmp_path: Path) -> None:
    root = tmp_path / "k400"
    _touch(root / "zumba" / "AAA_000010_000020.mp4")
    _touch(root / "air_drumming" / "BBB_000001_000011.mp4")  # downloader folder: spaces -> _
    _touch(root / "CCC_5_15.mp4")  # flat layout, unpadded
    csv_file = write_list(
        tmp_path / "train.csv",
        CSV_HEADER
        + "zumba,AAA,10,20,train\n"
        + '"air drumming",BBB,1.0,11.0,train\n'
        + "abseiling,CCC,5,15,train\n"
        + "zumba,DDD,0,10,val\n",
    )
    records, classes = parse_kinetics_csv(csv_file, root, split="train")
    assert classes == ["abseiling", "air drumming", "zumba"]
    assert [(Path(r.path).relative_to(root).as_posix(), r.label) for r in records] == [
        ("zumba/AAA_000010_000020.mp4", 2),
        ("air_drumming/BBB_000001_000011.mp4", 1),
        ("CCC_5_15.mp4", 0),
    ]
    # a given class list fixes the indices
    records, classes = parse_kinetics_csv(
        csv_file, root, split="train", classes=["zumba", "abseiling", "air drumming", "yoga"]
    )
    assert [r.label for r in records] == [0, 2, 1]
    # the val row's video is missing: an error naming the line, or dropped with on_missing="skip"
    with pytest.raises(FileNotFoundError, match=r"train\.csv:5: video not found for DDD"):
        parse_kinetics_csv(csv_file, root)
    records, _ = parse_kinetics_csv(csv_file, root, on_missing="skip")
    assert len(records) == 3
    with pytest.raises(
        ValueError, match=r"train\.csv:2: label 'zumba' is not one of the 1 classes"
    ):
        parse_kinetics_csv(csv_file, root, split="train", classes=["abseiling"])
    with pytest.raises(ValueError, match=r"has no rows with split 'test'"):
        parse_kinetics_csv(csv_file, root, split="test")
    # a split whose labels are a subset of the classes must not silently renumber them
    with pytest.raises(ValueError, match="num_classes is 400 but the data has 3 class names"):
        VideoDataset.from_kinetics_csv(csv_file, root, split="train", num_classes=400)


def test_kinetics_csv_malformed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bad_header = write_list(tmp_path / "h.csv", "label,id,start,end\nzumba,A,1,2\n")
    with pytest.raises(ValueError, match=r"h\.csv:1: header must contain"):
        parse_kinetics_csv(bad_header, root)
    bad_time = write_list(tmp_path / "t.csv", CSV_HEADER + "zumba,A,1,2,train\nzumba,B,x,2,train\n")
    with pytest.raises(ValueError, match=r"t\.csv:3: time_start/time_end must be numbers"):
        parse_kinetics_csv(bad_time, root)
    bad_fields = write_list(tmp_path / "f.csv", CSV_HEADER + "zumba,A,1\n")
    with pytest.raises(ValueError, match=r"f\.csv:2: expected 5 fields, got 3"):
        parse_kinetics_csv(bad_fields, root)
    with pytest.raises(FileNotFoundError, match="video data root not found"):
        parse_kinetics_csv(bad_time, tmp_path / "missing")


def test_class_folders(tmp_path: Path) -> None:
    _touch(tmp_path / "dog" / "2.mp4")
    _touch(tmp_path / "dog" / "1.MP4")
    _touch(tmp_path / "cat" / "x.avi")
    _touch(tmp_path / "cat" / "notes.txt")
    records, classes = scan_class_folders(tmp_path)
    assert classes == ["cat", "dog"]
    assert [(Path(r.path).name, r.label) for r in records] == [
        ("x.avi", 0),
        ("1.MP4", 1),
        ("2.mp4", 1),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        scan_class_folders(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="data root not found"):
        scan_class_folders(tmp_path / "missing")


# --- samplers -------------------------------------------------------------------------------------


def test_clip_indices_padding() -> None:
    assert clip_indices(2, 4, 3, 20) == [2, 5, 8, 11]
    assert clip_indices(0, 4, 4, 10, pad="loop") == [0, 4, 8, 2]
    assert clip_indices(0, 4, 4, 10, pad="repeat_last") == [0, 4, 8, 9]
    with pytest.raises(ValueError, match="unknown pad 'zero'"):
        clip_indices(0, 4, 4, 10, pad="zero")


def test_random_clip_sampler_range_and_determinism() -> None:
    sampler = RandomClipSampler(4, 2)  # span 7 -> starts 0..13 for 20 frames
    starts = set()
    for seed in range(200):
        (clip,) = sampler(20, torch.Generator().manual_seed(seed))
        assert clip == list(range(clip[0], clip[0] + 8, 2))
        starts.add(clip[0])
    assert starts == set(range(14))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sampler(100, g1) == sampler(100, g2)
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        RandomClipSampler(0, 2)


def test_uniform_clips_cover_the_video() -> None:
    sampler = UniformClipSampler(4, 2, 10)
    clips = sampler(100)
    assert len(clips) == 10
    assert clips[0][0] == 0 and clips[-1][-1] == 99
    starts = [c[0] for c in clips]
    assert starts == [round(k * 93 / 9) for k in range(10)]
    assert UniformClipSampler(4, 2, 1)(21) == [[7, 9, 11, 13]]  # one clip: centred
    assert UniformClipSampler(4, 4, 2)(10) == [[0, 4, 8, 2], [0, 4, 8, 2]]  # short: looped


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.video_io
@pytest.mark.parametrize("name", ["a.mp4", "c.webm", "d.avi", "e.h264"])
@pytest.mark.parametrize("seek_min", [4, 16])
def test_decode_selected_frames(
    videos: Path, name: str, seek_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # seek_min=4 makes clips starting at frame 4 or later seek (key frames every 4 frames)
    monkeypatch.setattr(video_module, "_SEEK_MIN_FRAMES", seek_min)
    seeks = []
    real_seek = VideoReader._seek

    def counting_seek(self: VideoReader, index: int) -> object:
        seeks.append(index)
        return real_seek(self, index)

    monkeypatch.setattr(VideoReader, "_seek", counting_seek)
    with VideoReader(videos / name) as reader:
        assert reader.num_frames == 20
        assert frame_ids(reader.get_frames([9, 11, 13, 19])) == [9, 11, 13, 19]
        assert frame_ids(reader.get_frames([0, 1, 2])) == [0, 1, 2]  # again on the same reader
        frames = reader.get_frames([3])
        assert frames.dtype == torch.uint8 and frames.shape == (1, 48, 64, 3)
    if name == "e.h264":
        assert seeks == []  # no metadata: every frame decoded once, then indexed
    else:  # later calls on the same reader seek back (to the start when the clip starts early)
        assert seeks == ([9, 0, 0] if seek_min == 4 else [0, 0])
    with VideoReader(videos / name) as reader:  # past-the-end indices get the last frame
        assert frame_ids(reader.get_frames([18, 25])) == [18, 19]


@pytest.mark.video_io
def test_stream_shorter_than_declared_is_unreadable(
    videos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # metadata over-counting by a frame or two is tolerated (last frame repeated) ...
    monkeypatch.setattr(VideoReader, "_metadata_frames", lambda self: 21)
    with VideoReader(videos / "a.mp4") as reader:
        assert frame_ids(reader.get_frames([19, 20])) == [19, 19]
    # ... a stream that stops far before its declared length is an error
    monkeypatch.setattr(VideoReader, "_metadata_frames", lambda self: 40)
    with (
        VideoReader(videos / "a.mp4") as reader,
        pytest.raises(
            video_module.VideoDecodeError, match=r"a\.mp4 ends at frame 19 but declares 40 frames"
        ),
    ):
        reader.get_frames([10, 30])


@pytest.mark.video_io
def test_read_clips_with_samplers(videos: Path) -> None:
    clips = read_clips(videos / "a.mp4", UniformClipSampler(4, 3, 3))
    assert [frame_ids(c) for c in clips] == [[0, 3, 6, 9], [5, 8, 11, 14], [10, 13, 16, 19]]
    (clip,) = read_clips(videos / "b.mp4", RandomClipSampler(4, 4))  # 10 frames: looped
    assert frame_ids(clip) == [0, 4, 8, 2]
    g = torch.Generator().manual_seed(3)
    (clip,) = read_clips(videos / "a.mp4", RandomClipSampler(8, 2), g)
    start = frame_ids(clip)[0]
    assert frame_ids(clip) == list(range(start, start + 16, 2))


def _ids_from_normalised(video: torch.Tensor) -> list[int]:
    """Frame ids of a (C, T, H, W) video normalised with mean 0, std 1 (values / 255)."""
    return frame_ids((video * 255).round().to(torch.uint8).permute(1, 2, 3, 0))  # (T, H, W, C)


SMALL = {"short_side_range": (48, 56), "crop_size": 40, "mean": (0, 0, 0), "std": (1, 1, 1)}


@pytest.mark.video_io
def test_dataset_train_sample(videos: Path, tmp_path: Path) -> None:
    lst = write_list(tmp_path / "l.txt", f"{videos / 'a.mp4'} 3\n{videos / 'b.mp4'} 1\n")
    ds = VideoDataset.from_list_file(lst, num_frames=4, stride=2, seed=7, **SMALL)
    sample = ds[0]
    assert set(sample) == {
        "video",
        "label",
        "index",
        "path",
        "skipped",
        "unreadable",
        "unreadable_index",
    }
    assert sample["video"].shape == (3, 4, 40, 40) and sample["video"].dtype == torch.float32
    assert (sample["label"], sample["index"], sample["skipped"]) == (3, 0, 0)
    ids = _ids_from_normalised(sample["video"])
    assert ids == list(range(ids[0], ids[0] + 8, 2))
    # seeded: the same sample again; another epoch draws another clip somewhere
    assert torch.equal(ds[0]["video"], sample["video"])
    other = []
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        other.append(_ids_from_normalised(ds[0]["video"])[0])
    assert set(other) != {ids[0]}
    assert ds.num_classes == 4


@pytest.mark.video_io
def test_dataset_test_mode_views_clip_major(videos: Path, tmp_path: Path) -> None:
    lst = write_list(tmp_path / "l.txt", f"{videos / 'a.mp4'} 0\n")
    ds = VideoDataset.from_list_file(
        lst, mode="test", num_frames=4, stride=3, num_clips=3, test_short_side=48,
        test_crop_size=48, mean=(0, 0, 0), std=(1, 1, 1),
    )  # fmt: skip
    video = ds[0]["video"]
    assert video.shape == (9, 3, 4, 48, 48) and ds.num_views == 9
    expected = [[0, 3, 6, 9], [5, 8, 11, 14], [10, 13, 16, 19]]
    for v in range(9):
        assert _ids_from_normalised(video[v]) == expected[v // 3]


# --- unreadable videos ----------------------------------------------------------------------------


@pytest.mark.video_io
def test_corrupted_videos_skipped_logged_and_counted(
    videos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lst = write_list(
        tmp_path / "l.txt",
        f"{videos / 'a.mp4'} 0\n{videos / 'garbage.mp4'} 1\n{videos / 'truncated.mp4'} 2\n"
        f"{videos / 'b.mp4'} 3\n",
    )
    ds = VideoDataset.from_list_file(lst, num_frames=4, stride=2, seed=0, **SMALL)
    with caplog.at_level(logging.WARNING, logger="nonlocalnet.data.video"):
        sample = ds[1]
    assert (sample["index"], sample["label"], sample["skipped"]) == (3, 3, 2)
    assert sample["unreadable"] == [str(videos / "garbage.mp4"), str(videos / "truncated.mp4")]
    assert "garbage.mp4" in caplog.text and "truncated.mp4" in caplog.text
    assert ds.num_skipped == 2 and ds.num_loaded == 1
    # batches stay full and the tracker sees every skip
    tracker = SkipTracker(max_skip_fraction=0.6)
    batch = collate_videos([ds[i] for i in range(4)])
    assert batch["video"].shape[0] == 4
    assert batch["index"].tolist() == [0, 3, 3, 3] and batch["skipped"].tolist() == [0, 2, 1, 0]
    tracker.update(batch)
    assert (tracker.num_skipped, tracker.num_reads) == (3, 7)
    strict = SkipTracker(max_skip_fraction=0.25)
    with pytest.raises(
        RuntimeError,
        match=r"3 of 7 samples \(42\.9%\) could not be read, more than max_skip_fraction=0\.25",
    ):
        strict.update(batch)
    assert "2 files" in tracker.summary() and "garbage.mp4" in tracker.summary()
    # counted by distinct entries: the same bad files read again (a later epoch) count once
    distinct = SkipTracker(max_skip_fraction=0.6, num_entries=len(ds))
    distinct.update(batch)
    distinct.update(collate_videos([ds[i] for i in range(4)]))
    assert (distinct.num_skipped, distinct.num_reads) == (2, 4)
    check_skip_fraction(1, 10, 0.1)  # at the limit: fine


@pytest.mark.video_io
def test_test_mode_reports_unreadable_without_replacing(videos: Path, tmp_path: Path) -> None:
    lst = write_list(tmp_path / "l.txt", f"{videos / 'a.mp4'} 0\n{videos / 'garbage.mp4'} 1\n")
    ds = VideoDataset.from_list_file(
        lst, mode="test", num_frames=2, stride=2, num_clips=2, num_crops=1,
        test_short_side=48, test_crop_size=48,
    )  # fmt: skip
    batch = collate_videos([ds[0], ds[1]])
    assert batch["video"].shape == (1, 2, 3, 2, 48, 48)
    assert batch["index"].tolist() == [0] and batch["label"].tolist() == [0]
    assert batch["unreadable"] == [str(videos / "garbage.mp4")]
    only_bad = collate_videos([ds[1]])
    assert only_bad["video"].shape[0] == 0 and only_bad["unreadable"] == [
        str(videos / "garbage.mp4")
    ]


@pytest.mark.video_io
def test_all_unreadable_raises(videos: Path, tmp_path: Path) -> None:
    lst = write_list(
        tmp_path / "l.txt", f"{videos / 'garbage.mp4'} 0\n{videos / 'truncated.mp4'} 0\n"
    )
    ds = VideoDataset.from_list_file(lst, **SMALL)
    with pytest.raises(RuntimeError, match="2 consecutive unreadable videos starting at index 1"):
        ds[1]


# --- workers --------------------------------------------------------------------------------------


@pytest.mark.video_io
def test_dataloader_two_workers_reproducible(videos: Path, tmp_path: Path) -> None:
    lst = write_list(tmp_path / "l.txt", "".join(f"{videos / 'a.mp4'} {i}\n" for i in range(8)))

    def starts(num_workers: int, seed: int | None, torch_seed: int = 0) -> list[int]:
        ds = VideoDataset.from_list_file(lst, num_frames=2, stride=1, seed=seed, **SMALL)
        torch.manual_seed(torch_seed)
        loader = DataLoader(ds, batch_size=2, num_workers=num_workers, collate_fn=collate_videos)
        out = []
        for batch in loader:
            assert batch["video"].shape == (2, 3, 2, 40, 40)
            out += [_ids_from_normalised(v)[0] for v in batch["video"]]
        return out

    with_workers = starts(2, None)
    assert len(with_workers) == 8
    assert starts(2, None) == with_workers  # reproducible given torch.manual_seed
    assert len(set(with_workers)) > 1  # workers do not repeat the same clip
    # with a dataset seed the clips do not depend on the number of workers
    assert starts(2, 11) == starts(0, 11)


@pytest.mark.video_io
def test_dataset_pickles_for_spawned_workers(videos: Path, tmp_path: Path) -> None:
    lst = write_list(tmp_path / "l.txt", f"{videos / 'a.mp4'} 0\n")
    for mode in ("train", "test"):
        ds = VideoDataset.from_list_file(
            lst, mode=mode, num_frames=2, stride=2, num_clips=2, seed=5, cache_frames=True,
            test_short_side=48, test_crop_size=48, **SMALL,
        )  # fmt: skip
        first = ds[0]["video"]
        clone = pickle.loads(pickle.dumps(ds))
        assert clone._frame_cache == {} and torch.equal(clone[0]["video"], first)


@pytest.mark.video_io
def test_frame_cache_gives_the_same_samples_without_the_file(videos: Path, tmp_path: Path) -> None:
    copy = tmp_path / "a.mp4"
    copy.write_bytes((videos / "a.mp4").read_bytes())
    lst = write_list(tmp_path / "l.txt", "a.mp4 0\n")
    plain = VideoDataset.from_list_file(lst, num_frames=4, stride=3, seed=1, **SMALL)
    cached = VideoDataset.from_list_file(
        lst, num_frames=4, stride=3, seed=1, cache_frames=True, **SMALL
    )
    first = cached[0]["video"]
    assert torch.equal(first, plain[0]["video"])
    copy.unlink()  # the second epoch reads from memory
    for epoch in (1, 2):
        cached.set_epoch(epoch)
        sample = cached[0]
        assert sample["skipped"] == 0
        ids = _ids_from_normalised(sample["video"])
        assert ids == list(range(ids[0], ids[0] + 10, 3))
    assert cached.num_skipped == 0


@pytest.mark.video_io
def test_folder_and_kinetics_datasets_decode(videos: Path, tmp_path: Path) -> None:
    data = (videos / "a.mp4").read_bytes()
    for rel in [
        "folders/walk/v1.mp4",
        "folders/run/v2.mp4",
        "k400/air_drumming/X_000002_000012.mp4",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    ds = VideoDataset.from_folder(tmp_path / "folders", num_frames=2, stride=5, seed=0, **SMALL)
    assert ds.classes == ["run", "walk"] and [ds[i]["label"] for i in range(2)] == [0, 1]
    ids = _ids_from_normalised(ds[1]["video"])
    assert ids[1] - ids[0] == 5
    csv_file = write_list(tmp_path / "k.csv", CSV_HEADER + "air drumming,X,2,12,val\n")
    ds = VideoDataset.from_kinetics_csv(
        csv_file, tmp_path / "k400", classes=["abseiling", "air drumming"], num_frames=2,
        stride=5, seed=0, **SMALL,
    )  # fmt: skip
    sample = ds[0]
    assert sample["label"] == 1 and ds.num_classes == 2 and sample["video"].shape == (3, 2, 40, 40)
