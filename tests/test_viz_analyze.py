"""``nonlocalnet analyze``: the query-independence report per block."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from nonlocalnet import NonLocal2d
from nonlocalnet.cli import main
from nonlocalnet.engine.checkpoint import save_checkpoint
from nonlocalnet.models import create_model
from nonlocalnet.viz.analyze import COLUMNS, analyze_model, dataset_samples, wrap_title

RANDOM_DATA = {
    "task": "video",
    "format": "toy:datasets",
    "num_classes": 10,
    "num_frames": 8,
    "train_crop": 32,
    "test_crop": 32,
    "kwargs": {"num_samples": 4},
}


def _trained_like(model: nn.Module, zero_theta: bool) -> nn.Module:
    """Random ('trained') NL weights; θ zeroed makes every query's map the same (uniform)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".after." in n or n.startswith("1."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                if zero_theta and ".theta." in f".{n}":
                    p.zero_()
    return model


def test_theta_zeroed_gives_zero_attention_distance() -> None:
    samples = [torch.randn(3, 12, 12) for _ in range(3)]
    model = _trained_like(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), NonLocal2d(8)), True)
    (row,) = analyze_model(model, samples, num_pairs=200)
    assert set(COLUMNS) <= set(row)
    assert row["block"] == "1" and row["type"] == "NonLocal2d" and row["samples"] == 3
    assert row["attention_mean"] == pytest.approx(0.0, abs=1e-6)
    assert row["attention_std"] == pytest.approx(0.0, abs=1e-6)
    # uniform maps give the same output at every position, while the inputs differ.
    assert row["output_mean"] == pytest.approx(0.0, abs=1e-5)
    assert row["input_mean"] > 0.05
    assert len(row["per_sample"]["input"]) == 3
    # Control: with θ set, the maps depend on the query.
    model = _trained_like(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), NonLocal2d(8)), False)
    (row,) = analyze_model(model, samples, num_pairs=200)
    assert row["attention_mean"] > 0.01


def test_mean_and_std_are_over_samples() -> None:
    model = _trained_like(nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), NonLocal2d(8)), False)
    samples = [torch.randn(3, 12, 12) for _ in range(4)]
    (row,) = analyze_model(model, samples, num_pairs=50, seed=1)
    values = torch.tensor(row["per_sample"]["attention"], dtype=torch.float64)
    assert row["attention_mean"] == pytest.approx(float(values.mean()))
    assert row["attention_std"] == pytest.approx(float(values.std()))  # sample std (n - 1)


def _checkpoint(path: Path, name: str, zero_theta: bool) -> Path:
    model = _trained_like(create_model(name), zero_theta)
    config = {
        "model": {"name": name, "kwargs": {}},
        "data": RANDOM_DATA,
        "eval": {"num_clips": 1, "num_crops": 1},
    }
    save_checkpoint(path, {"model": model.state_dict(), "step": 0, "config": config})
    return path


def test_analyze_cli_on_the_checkpoints_validation_set(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "nl.pt", "nl_c2d_tiny", zero_theta=True)
    out = tmp_path / "report"
    argv = ["analyze", "--checkpoint", str(ckpt), "--samples", "2", "--pairs", "100"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    block_type = type(create_model("nl_c2d_tiny").get_submodule("layer2.0.after")).__name__
    assert f"| layer2.0.after | {block_type} | 2 |" in printed
    with (out / "query_independence.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["block"] for r in rows] == ["layer2.0.after", "layer3.0.after"]
    for r in rows:
        assert float(r["attention_mean"]) == pytest.approx(0.0, abs=1e-6)
        assert float(r["input_mean"]) > 0.01
    report = json.loads((out / "query_independence.json").read_text())
    assert report["samples"] == 2 and report["model"] == "nl_c2d_tiny"
    assert len(report["blocks"]) == 2
    with Image.open(out / "query_independence.png") as im:
        assert im.format == "PNG"
        assert im.size == (620, 480)  # max(6, 1.6 * 2 + 3) x 4.8 inches at 100 dpi


def test_analyze_without_attention_blocks_names_them(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "c2d.pt", "c2d_tiny", zero_theta=False)
    assert main(["analyze", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "no NonLocal/SNL/GC/APNB/AFNB blocks" in err and "layer1 (" in err


def test_analyze_cli_on_files_in_a_folder(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "nl.pt", "nl_c2d_tiny", zero_theta=True)
    folder = tmp_path / "inputs"
    folder.mkdir()
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an input")
    out = tmp_path / "report"
    argv = ["analyze", "--checkpoint", str(ckpt), "--data", str(folder), "--samples", "2"]
    assert main([*argv, "--pairs", "50", "--out", str(out)]) == 0
    assert "on inputs: 2 samples, 50 pairs each" in capsys.readouterr().out
    report = json.loads((out / "query_independence.json").read_text())
    assert report["data"] == "inputs" and report["samples"] == 2 and report["pairs"] == 50
    for row in report["blocks"]:
        assert row["samples"] == 2
        assert row["attention_mean"] == pytest.approx(0.0, abs=1e-6)
        assert row["input_mean"] > 0.01
    assert main(["analyze", "--checkpoint", str(ckpt), "--data", str(tmp_path / "none")]) == 2
    assert "--data: " in capsys.readouterr().err


def test_dataset_samples_take_the_first_view_and_skip_unreadable() -> None:
    views = torch.arange(2 * 3 * 2 * 4 * 4).reshape(2, 3, 2, 4, 4)  # (views, C, T, H, W)
    clip = torch.ones(3, 2, 4, 4, dtype=torch.uint8)
    items = [{"video": views, "label": 0}, {"video": None, "label": 1}, {"video": clip}]
    got = list(dataset_samples(items, video=True))
    assert len(got) == 2 and all(x.dtype == torch.float32 for x in got)
    torch.testing.assert_close(got[0], views[0].float())
    torch.testing.assert_close(got[1], clip.float())
    image = torch.full((3, 4, 4), 2.0)
    (x,) = dataset_samples([{"image": image}], video=False)
    torch.testing.assert_close(x, image)


def test_wrap_title_breaks_after_separators() -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    assert wrap_title(f"{a}: {b}; {c}", 90) == f"{a}: {b};\n{c}"
    assert wrap_title(f"{a}: {b}", 50) == f"{a}:\n{b}"
    assert wrap_title("x" * 100, 90) == "x" * 100  # nowhere to break
