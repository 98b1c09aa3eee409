"""``nonlocalnet demo --task detection``: the comparison end to end at a tiny budget, its checks
and its command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nonlocalnet.apps.demo import (
    CONFIG_DIR,
    DETECTION_CONFIGS,
    load_demo_configs,
    run_detection_demo,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # pycocotools decodes masks with numpy 2 deprecated array copies
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

TINY = [
    "data.kwargs.num_train=4",
    "data.kwargs.num_val=2",
    "data.num_workers=0",
    "train.steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.eval_every=0",
    "model.kwargs.box_score_thresh=0.0",
]


def test_tiny_detection_demo_writes_the_report(tmp_path: Path) -> None:
    report = run_detection_demo(tmp_path / "out", overrides=TINY, data_root=tmp_path / "data")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["models"].keys() == DETECTION_CONFIGS.keys() == report["models"].keys()
    assert saved["baseline"] == "maskrcnn"
    names = {k: m["model"] for k, m in saved["models"].items()}
    assert names == {"maskrcnn": "maskrcnn_tiny", "gc_maskrcnn": "gc_maskrcnn_tiny",
                     "nl_maskrcnn": "nl_maskrcnn_tiny"}  # fmt: skip
    for m in saved["models"].values():
        assert 0.0 <= m["box_ap"] <= 100.0 and 0.0 <= m["mask_ap"] <= 100.0
        assert m["steps"] == 2 and m["train_time_s"] > 0 and m["step_ms"] > 0
        assert [s for s, _ in m["curves"]["loss"]] == [1, 2]
        assert m["curves"]["val_bbox_AP"][-1][0] == 2
    assert saved["models"]["gc_maskrcnn"]["params"] > saved["models"]["maskrcnn"]["params"]
    assert saved["budget"]["steps"] == 2 and saved["data"]["spec"]["num_train"] == 4
    assert set(saved["met"]) == {"gc_maskrcnn_beats_maskrcnn", "nl_maskrcnn_beats_maskrcnn",
                                 "total_time_s"}  # fmt: skip
    from PIL import Image

    with Image.open(tmp_path / "out" / "learning_curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 400)
    assert (tmp_path / "out" / "runs" / "gc_maskrcnn" / "model.safetensors").is_file()


def test_detection_demo_configs_share_everything_but_the_model(tmp_path: Path) -> None:
    configs = load_demo_configs(names=DETECTION_CONFIGS, data_format="synthetic_detection")
    assert [c.model.name for c in configs.values()] == [
        "maskrcnn_tiny",
        "gc_maskrcnn_tiny",
        "nl_maskrcnn_tiny",
    ]
    for name in DETECTION_CONFIGS.values():
        shutil.copy(CONFIG_DIR / name, tmp_path / name)
    with (tmp_path / DETECTION_CONFIGS["nl_maskrcnn"]).open("a") as f:
        f.write("optim:\n  lr: 0.2\n")
    with pytest.raises(ValueError, match=r"differ in optim\.lr"):
        run_detection_demo(tmp_path / "out", config_dir=tmp_path)
    with pytest.raises(ValueError, match=r"data\.format must be 'synthetic_detection'"):
        load_demo_configs(data_format="synthetic_detection")  # the video demo's configs


def test_cli_parses_the_detection_demo() -> None:
    from nonlocalnet.cli import parse

    args = parse(["demo", "--task", "detection", "train.steps=3"])
    assert args.task == "detection" and args.overrides == ["train.steps=3"] and args.out is None
    assert parse(["demo"]).task == "video"
