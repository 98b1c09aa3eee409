"""Attention figures: ``draw_model_attention`` on a built model, ``nonlocalnet visualize`` end to
end on a tiny hand-set checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nonlocalnet import NonLocal2d
from nonlocalnet.cli import main
from nonlocalnet.cli.visualize import parse_query
from nonlocalnet.engine.checkpoint import load_model, save_checkpoint
from nonlocalnet.models import create_model
from nonlocalnet.viz.attention import DPI, format_weight, grid_figsize
from nonlocalnet.viz.visualize import draw_model_attention, load_input

DATA = {
    "task": "video",
    "num_classes": 10,
    "num_frames": 8,
    "sampling_rate": 2,
    "test_short_side": 32,
    "test_crop": 32,
    "mean": [0.45, 0.45, 0.45],
    "std": [0.225, 0.225, 0.225],
}


def _checkpoint(path: Path, name: str) -> Path:
    """A checkpoint following the engine's contract; NL blocks given random ('trained') weights."""
    model = create_model(name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".after." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    config = {"model": {"name": name, "kwargs": {}}, "data": DATA}
    save_checkpoint(path, {"model": model.state_dict(), "step": 0, "config": config})
    return path


def _frames() -> np.ndarray:
    frames = np.zeros((20, 40, 48, 3), np.uint8)
    frames[:] = (30, 60, 90)
    for t in range(20):
        frames[t, 8 + t : 18 + t, 4 + t : 14 + t] = (250, 200, 30)  # a moving square
    return frames


def test_visualize_image_topk_match_the_reference_map(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "nl.pt", "nl_c2d_tiny")
    img = tmp_path / "still.png"
    Image.fromarray(_frames()[6]).save(img)
    out = tmp_path / "figs"
    argv = ["visualize", "--checkpoint", str(ckpt), "--input", str(img), "--out", str(out)]
    argv += ["--block", "layer2.0.after", "--queries", "5,20,12", "--k", "6", "--max-frames", "2"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["blocks"]
    (query,) = entry["queries"]
    # layer2 grid: frames at stride 2 (start 0.5), pixels at stride 8 (start 0).
    assert query["feature_position"] == [2, 2, 2]
    assert query["pixel"] == [4.5, 16.0, 16.0]

    # Reference: the block's map on the same prepared input, row of query (2, 2, 2).
    model, config = load_model(ckpt)
    x, _ = load_input(img, config["data"], video=True)
    block = model.get_submodule("layer2.0.after")
    seen = {}
    block.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x[None])
    block.impl = "reference"
    row = block.attention_map(seen["x"])[0, 2 * 16 + 2 * 4 + 2]  # (M,)
    ref = torch.topk(row, 6)
    assert query["topk_keys"] == ref.indices.tolist()
    np.testing.assert_allclose(query["topk_weights"], ref.values.numpy(), rtol=1e-5)
    # the own key: the 2x2 pooled cell (t, h // 2, w // 2) = (2, 1, 1) of the (4, 2, 2) keys
    assert entry["exclude_self"] is False
    assert query["self_key"] == 2 * 4 + 1 * 2 + 1
    assert query["self_weight"] == pytest.approx(float(row[query["self_key"]]), rel=1e-5)
    # pooled key (t, i, j) -> frame 2t + 0.5, pixel 16i + 4, 16j + 4 (centre of a 2x2 cell).
    for m, pix in zip(query["topk_keys"], query["topk_pixels"], strict=True):
        t, i, j = m // 4, (m // 2) % 2, m % 2
        assert pix == [2 * t + 0.5, 16.0 * i + 4.0, 16.0 * j + 4.0]
    for f, legend in zip(query["files"], (True, False), strict=True):  # arrows, heat map
        with Image.open(f) as im:
            assert im.format == "PNG"
            w, h = grid_figsize(2, legend=legend)
            assert im.size == (round(w * DPI), round(h * DPI))


@pytest.mark.video_io
def test_visualize_video_every_block(tmp_path: Path) -> None:
    from nonlocalnet.data.synthetic import write_mp4

    ckpt = _checkpoint(tmp_path / "nl.pt", "nl_c2d_tiny")
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, _frames())
    out = tmp_path / "figs"
    argv = ["visualize", "--checkpoint", str(ckpt), "--input", str(clip), "--out", str(out)]
    assert main([*argv, "--num-queries", "1", "--k", "3", "--max-frames", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [b["block"] for b in summary["blocks"]] == ["layer2.0.after", "layer3.0.after"]
    assert summary["input_shape"] == [3, 8, 32, 32]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        f"layer{s}_0_after_q0_{kind}.png" for s in (2, 3) for kind in ("arrows", "heatmap")
    ]


def test_checkpoint_without_attention_block_names_its_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _checkpoint(tmp_path / "c2d.pt", "c2d_tiny")
    img = tmp_path / "still.png"
    Image.fromarray(_frames()[0]).save(img)
    assert main(["visualize", "--checkpoint", str(ckpt), "--input", str(img)]) == 2
    err = capsys.readouterr().err
    assert "no NonLocal/SNL/GC/APNB/AFNB blocks" in err
    assert "model has: conv1 (Conv3d)" in err and "layer4 (" in err


def test_bad_query_and_input_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "nl.pt", "nl_c2d_tiny")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert main(["visualize", "--checkpoint", str(ckpt), "--input", str(notes)]) == 2
    assert "unknown input type '.txt'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["visualize", "--checkpoint", str(ckpt), "--input", str(notes), "--queries", "1"])


def test_draw_model_attention_on_an_image_model(tmp_path: Path) -> None:
    """The library call on a built (not zoo) image model: top-k of the reference map, JSON file."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), NonLocal2d(8))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model[1].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(3, 12, 12, generator=g)
    out = tmp_path / "figs"
    summary = draw_model_attention(
        model, x, queries=[(8, 4)], k=5, out_dir=out, input_name="a/b.png", meta={"run": "r1"}
    )
    assert summary == json.loads((out / "summary.json").read_text())
    assert list(summary) == ["run", "model", "input", "input_shape", "blocks"]
    assert summary["model"] == "Sequential" and summary["input"] == "a/b.png"
    assert summary["input_shape"] == [3, 12, 12]
    (entry,) = summary["blocks"]
    assert (entry["block"], entry["type"], entry["kind"]) == ("1", "NonLocal2d", "pairwise")
    (query,) = entry["queries"]
    # conv k3 s2 p1: feature (i, j) is centred on pixel (2i, 2j) of the 6x6 grid.
    assert query["feature_position"] == [4, 2] and query["pixel"] == [8.0, 4.0]
    with torch.no_grad():
        feats = model[0](x[None])  # (1, 8, 6, 6)
        model[1].impl = "reference"
        row = model[1].attention_map(feats)[0, 4 * 6 + 2]  # (36,)
    ref = torch.topk(row, 5)
    assert query["topk_keys"] == ref.indices.tolist()
    np.testing.assert_allclose(query["topk_weights"], ref.values.numpy(), rtol=1e-5)
    assert query["topk_pixels"] == [[2.0 * (m // 6), 2.0 * (m % 6)] for m in query["topk_keys"]]
    assert [Path(f).name for f in query["files"]] == ["1_q0_arrows.png", "1_q0_heatmap.png"]
    assert all(Path(f).is_file() for f in query["files"])
    with pytest.raises(ValueError, match="unknown block '0'; expected one of '1'"):
        draw_model_attention(model, x, blocks=["0"], out_dir=out)


def test_parse_query() -> None:
    assert parse_query("1,2.5,3") == (1.0, 2.5, 3.0)
    assert parse_query("4,5") == (4.0, 5.0)
    for bad in ("1", "1,2,3,4", "a,b"):
        with pytest.raises(ValueError, match=f"expected t,y,x or y,x in input pixels, got '{bad}'"):
            parse_query(bad)


def test_visualize_exclude_self(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--exclude-self: the top k of the other keys, weights as they are; the own key reported."""
    ckpt = _checkpoint(tmp_path / "nl.pt", "nl_c2d_tiny")
    img = tmp_path / "still.png"
    Image.fromarray(_frames()[6]).save(img)
    out = tmp_path / "figs"
    argv = ["visualize", "--checkpoint", str(ckpt), "--input", str(img), "--out", str(out)]
    argv += ["--block", "layer2.0.after", "--queries", "5,20,12", "--k", "4", "--exclude-self"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    (entry,) = json.loads((out / "summary.json").read_text())["blocks"]
    (query,) = entry["queries"]
    assert entry["exclude_self"] is True
    own = query["self_key"]
    assert own == 2 * 4 + 1 * 2 + 1

    model, config = load_model(ckpt)
    x, _ = load_input(img, config["data"], video=True)
    block = model.get_submodule("layer2.0.after")
    seen = {}
    block.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x[None])
    block.impl = "reference"
    row = block.attention_map(seen["x"])[0, 2 * 16 + 2 * 4 + 2]  # (M,)
    others = row.clone()
    others[own] = -float("inf")
    ref = torch.topk(others, 4)
    assert own not in query["topk_keys"]
    assert query["topk_keys"] == ref.indices.tolist()
    np.testing.assert_allclose(query["topk_weights"], row[ref.indices].numpy(), rtol=1e-5)
    assert query["self_weight"] == pytest.approx(float(row[own]), rel=1e-5)
    assert f"own key weight {format_weight(query['self_weight'])}, top other weight" in printed


def test_detection_models_are_drawn_and_analysed_on_their_backbone(tmp_path: Path) -> None:
    """A detector's blocks are seen on the image as the detector resizes and normalises it."""
    from nonlocalnet.models.detection import create_detection_model
    from nonlocalnet.viz.analyze import analyze_model
    from nonlocalnet.viz.visualize import detection_view, draw_model_attention, select_blocks

    torch.manual_seed(0)
    model = create_detection_model(
        arch="faster_rcnn", blocks="gc", num_classes=3, min_size=128, max_size=160
    ).eval()
    image = (torch.rand(100, 140, 3) * 255).to(torch.uint8)
    body, x, frames = detection_view(model, image)
    assert x.shape == (3, 128, 160) and frames.shape == (1, 128, 160, 3)
    # the drawn pixels are the detector's own input (de-normalised), not the file's
    mean = torch.tensor(model.transform.image_mean).view(3, 1, 1)
    std = torch.tensor(model.transform.image_std).view(3, 1, 1)
    back = torch.from_numpy(frames[0]).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, (x * std + mean).clamp(0, 1), atol=1 / 255)
    names = [n for n, _ in select_blocks(body)]
    assert names[0] == "layer2.0.gc" and len(names) == 13  # GC in every bottleneck of c3-c5
    summary = draw_model_attention(
        body, x, frames, blocks=[names[0]], num_queries=1, k=4, out_dir=tmp_path
    )
    assert summary["blocks"][0]["kind"] == "query_independent"
    rows = analyze_model(body, [x], num_pairs=40, block_names=names[:2])
    assert [r["block"] for r in rows] == names[:2]
    assert all(r["attention_mean"] < 1e-9 for r in rows)  # GC: one map for every query
