"""``torchrun --nproc_per_node=2`` (gloo, CPU) trains to the same parameters as one process with
the same global batch, and gathers evaluation results over the processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent  # holds toy.py, imported by the configs

pytestmark = pytest.mark.distributed

# No BatchNorm (its statistics are per process under DDP) and no dropout (each process draws its
# own masks): with those, 2 x batch 2 and 1 x batch 4 compute the same mean gradient.
CONFIG = {
    "model": {"name": "toy:toy_video", "kwargs": {"nonlocal_block": True, "width": 6}},
    "data": {
        "task": "video",
        "format": "toy:datasets",
        "num_classes": 3,
        "num_frames": 2,
        "train_crop": 6,
        "kwargs": {
            "num_samples": 7
        },  # odd: the 2-process evaluation pads one sample and must drop it
        "num_workers": 0,
    },
    "optim": {"lr": 0.2, "weight_decay": 1.0e-3},
    "schedule": {"name": "step", "milestones": [3], "warmup_steps": 2},
    "train": {
        "steps": 5,
        "seed": 1,
        "log_every": 1,
        "checkpoint_every": 5,
        "progress": False,
    },
    "eval": {"batch_size": 2, "num_clips": 2, "num_crops": 1, "topk": [1, 2]},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(tmp_path: Path, name: str, nproc: int, batch_size: int) -> tuple[Path, dict]:
    cfg = dict(CONFIG, train=dict(CONFIG["train"], batch_size=batch_size))
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    train = ["-m", "nonlocalnet.cli", "train", "--config", str(config), "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *train]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "final_metrics.json").read_text())


def test_two_process_gloo_equals_one_process_same_global_batch(tmp_path: Path) -> None:
    one, metrics_one = _run(tmp_path, "one", nproc=1, batch_size=4)
    two, metrics_two = _run(tmp_path, "two", nproc=2, batch_size=2)

    a = load_file(str(one / "model.safetensors"))
    b = load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    # ... and training moved the weights (the comparison is not between two initialisations).
    from nonlocalnet.engine import build_model, config_from_dict

    torch.manual_seed(CONFIG["train"]["seed"])
    init = build_model(config_from_dict(CONFIG)).state_dict()
    assert (a["fc.weight"] - init["fc.weight"]).abs().max() > 1e-3

    # Training loss logged by rank 0 is the mean over processes: the same as one process's.
    for ma, mb in (
        (json.loads(x), json.loads(y))
        for x, y in zip((one / "metrics.jsonl").read_text().splitlines(),
                        (two / "metrics.jsonl").read_text().splitlines(), strict=True)
    ):  # fmt: skip
        assert ma["step"] == mb["step"]
        if ma["split"] == "train":
            assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-5)
    # Evaluation: 7 videos sharded over 2 processes (one padded duplicate), gathered by index.
    assert metrics_one["val_num_samples"] == metrics_two["val_num_samples"] == 7
    assert metrics_two["val_top1"] == pytest.approx(metrics_one["val_top1"])
    assert metrics_two["val_top2"] == pytest.approx(metrics_one["val_top2"])
    # Only rank 0 wrote: one checkpoint, one line per logging step.
    assert sorted(p.name for p in two.glob("checkpoint_*.pt")) == ["checkpoint_00000005.pt"]
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 5]
