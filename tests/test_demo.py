"""``nonlocalnet demo``: the pipeline end to end (tiny), its checks, and a reduced-size run (slow)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from nonlocalnet.apps.demo import (
    DEFAULT_CONFIGS,
    _find_config,
    attention_on_early_cue,
    load_demo_configs,
    run_demo,
)

pytestmark = pytest.mark.video_io

TINY = [
    "data.kwargs.num_train=32",
    "data.kwargs.num_val=16",
    "data.num_workers=0",
    "train.steps=4",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=2",
    "eval.batch_size=16",
]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("demo")
    report = run_demo(root / "out", overrides=TINY, data_root=root / "data")
    return report, root / "out"


def test_tiny_demo_writes_the_report(tiny_report: tuple[dict, Path]) -> None:
    report, out = tiny_report
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["models"].keys() == {"c2d", "nl_c2d"}
    assert saved["chance"] == 0.5
    assert saved["data"]["num_train"] == 32 and saved["data"]["num_val"] == 16
    assert saved["data"]["spec"]["frames"] == 8 and saved["data"]["spec"]["seed"] == 0
    assert saved["protocol"]["num_clips"] * saved["protocol"]["num_crops"] == 3
    for key, name in (("c2d", "c2d_tiny"), ("nl_c2d", "nl_c2d_tiny")):
        m = saved["models"][key]
        assert m["model"] == name
        # 16 held-out clips: top-1 is a multiple of 1/16
        assert 0.0 <= m["top1"] <= 1.0 and (16 * m["top1"]) == pytest.approx(round(16 * m["top1"]))
        assert m["train_time_s"] > 0 and m["steps"] == 4
        assert [s for s, _ in m["curves"]["loss"]] == [1, 2, 3, 4]
        assert [s for s, _ in m["curves"]["val_top1"]] == [2, 4]
        assert m["curves"]["val_top1"][-1][1] == pytest.approx(m["top1"])
    # same budget: the NL blocks start as the identity (zero-initialised BN) and the data order
    # and augmentation are the same, so the first step's loss is the same for both models
    first = [saved["models"][k]["curves"]["loss"][0][1] for k in ("c2d", "nl_c2d")]
    assert first[0] == pytest.approx(first[1], abs=1e-5)
    assert saved["models"]["nl_c2d"]["params"] > saved["models"]["c2d"]["params"]
    assert saved["data"]["decode_ms_per_clip"] > 0 and saved["data"]["cached_ms_per_clip"] > 0
    assert report["models"]["c2d"]["top1"] == saved["models"]["c2d"]["top1"]


def test_tiny_demo_figures_are_valid_pngs(tiny_report: tuple[dict, Path]) -> None:
    report, out = tiny_report
    w, h = _png_size(out / "learning_curves.png")
    assert w >= 400 and h >= 200
    att = report["attention"]
    assert len(att["figure"]) == 2  # arrows and heat map
    for path in att["figure"]:
        assert Path(path).parent == out / "attention"
        assert min(_png_size(Path(path))) > 100
    share = att["attention_on_early_cue"]["same"][att["figure_block"]]
    assert 0.0 <= share <= 1.0
    assert 0.0 < att["uniform_attention_on_early_cue"][att["figure_block"]] < 0.5


def test_tiny_demo_reuses_the_generated_data(tiny_report: tuple[dict, Path]) -> None:
    report, out = tiny_report
    folder = Path(report["data"]["folder"])
    assert (folder / "train.txt").read_text().count("\n") == 32
    assert not report["data"]["cached"]  # first run generated it
    configs = load_demo_configs(TINY, data_root=folder.parent)
    assert configs["c2d"].data.root == str(folder.parent)
    # a second demo into the same folder reuses the data and starts its runs afresh
    again = run_demo(out, overrides=TINY, data_root=folder.parent, attention=False)
    assert again["data"]["cached"] and again["data"]["folder"] == str(folder)
    for key in ("c2d", "nl_c2d"):
        assert [s for s, _ in again["models"][key]["curves"]["loss"]] == [1, 2, 3, 4]
        # same seed, same data, same budget: the same result
        assert again["models"][key]["top1"] == report["models"][key]["top1"]


def test_attention_share_on_early_cue_by_hand() -> None:
    # four keys: on the early cue in frame 0, same place in the late frames, elsewhere in frame 0,
    # and on the cue in frame 1 (still early with cue_frames=2)
    pixels = torch.tensor(
        [[0.0, 8.0, 8.0], [7.0, 8.0, 8.0], [0.0, 24.0, 24.0], [1.0, 10.0, 9.0]]
    )  # (M, 3) (t, y, x)
    weights = torch.tensor([0.5, 0.2, 0.2, 0.1])
    assert attention_on_early_cue(pixels, weights, (8, 8), 2, 3.0) == pytest.approx(0.6)
    assert attention_on_early_cue(pixels, weights, (8, 8), 1, 3.0) == pytest.approx(0.5)


def test_configs_must_share_the_budget(tmp_path: Path) -> None:
    for name in DEFAULT_CONFIGS.values():
        shutil.copy(_find_config(name, None), tmp_path / name)
    load_demo_configs(config_dir=tmp_path)  # the shipped pair is consistent
    path = tmp_path / DEFAULT_CONFIGS["nl_c2d"]
    text, changed = re.subn(r"^  lr: .*$", "  lr: 0.2", path.read_text(), flags=re.M)
    assert changed == 1
    path.write_text(text)
    with pytest.raises(ValueError, match=r"differ in optim\.lr"):
        load_demo_configs(config_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"demo_c2d\.yaml"):
        load_demo_configs(config_dir=tmp_path / "missing")


def test_cli_parses_demo_arguments() -> None:
    from nonlocalnet.cli import parse

    args = parse(["demo", "train.steps=3", "--out", "x"])
    assert args.out == "x" and args.overrides == ["train.steps=3"]
    assert args._module.__name__ == "nonlocalnet.cli.demo"


@pytest.mark.slow
def test_reduced_demo_nl_clearly_above_chance(tmp_path: Path) -> None:
    """A reduced demo (fewer clips and steps than ``make demo``): NL-C2D well above chance."""
    report = run_demo(
        tmp_path / "out",
        overrides=[
            "data.kwargs.num_train=768",
            "data.kwargs.num_val=256",
            "train.steps=500",
            "train.eval_every=0",
        ],
        data_root=tmp_path / "data",
        attention=False,
    )
    nl, c2d = report["models"]["nl_c2d"]["top1"], report["models"]["c2d"]["top1"]
    assert nl >= 0.75, (nl, c2d)
    assert nl - c2d >= 0.15, (nl, c2d)
