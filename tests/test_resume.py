"""A training process killed with SIGKILL after its first checkpoint, then resumed with
``--resume``, ends with exactly the weights of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nonlocalnet.engine.checkpoint import latest_checkpoint, load_checkpoint

TESTS = Path(__file__).resolve().parent  # holds toy.py, imported by the configs

# Tiny video model with BatchNorm, dropout and a non-local block, random data with a random flip:
# every source of randomness the resume has to reproduce (data order, augmentation, dropout).
CONFIG = {
    "model": {
        "name": "toy:toy_video",
        "kwargs": {"norm": True, "dropout": 0.3, "nonlocal_block": True, "width": 4},
    },
    "data": {
        "task": "video",
        "format": "toy:datasets",
        "num_classes": 3,
        "num_frames": 2,
        "train_crop": 6,
        "kwargs": {"num_samples": 10},  # not a multiple of the batch: epochs straddle steps
        "num_workers": 1,
    },
    "optim": {"lr": 0.05, "weight_decay": 1.0e-3},
    "schedule": {"name": "cosine", "warmup_steps": 3},
    "train": {
        "steps": 40,
        "batch_size": 4,
        "seed": 3,
        "log_every": 5,
        "checkpoint_every": 10,
        "keep_checkpoints": 10,
        # Evaluation with precise BN (which rewrites the BN statistics) every 10 steps.
        "eval_every": 10,
        "precise_bn_batches": 2,
        "progress": False,
    },
    "eval": {"batch_size": 4, "num_clips": 2, "num_crops": 1},
}


def _command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nonlocalnet.cli", "train", "--config", str(config),
            "--out", str(out), *extra]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def _slow_config(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    config = _slow_config(tmp_path)
    full, killed = tmp_path / "full", tmp_path / "killed"

    subprocess.run(_command(config, full), check=True, env=_env(), timeout=300,
                   capture_output=True)  # fmt: skip

    # Start the same run, kill it (SIGKILL: no clean-up) as soon as its first checkpoint exists.
    proc = subprocess.Popen(_command(config, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while latest_checkpoint(killed) is None:
            assert proc.poll() is None, "the run ended before writing its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = load_checkpoint(latest_checkpoint(killed))["step"]
    assert 10 <= killed_at < 40, f"killed too late to test anything (step {killed_at})"
    assert not (killed / "model.safetensors").exists()

    result = subprocess.run(_command(config, killed, "--resume"), env=_env(), timeout=300,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stderr

    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # Optimiser state too (momentum buffers), from the final checkpoints.
    sa = load_checkpoint(latest_checkpoint(full))
    sb = load_checkpoint(latest_checkpoint(killed))
    assert sa["step"] == sb["step"] == 40
    for ka, kb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert torch.equal(ka["momentum_buffer"], kb["momentum_buffer"])
    # The metrics log of the resumed run has each logging step once and matches the full run's.
    lines_a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [(x["split"], x["step"]) for x in lines_b] == [
        ("train", 5), ("train", 10), ("val", 10), ("train", 15), ("train", 20), ("val", 20),
        ("train", 25), ("train", 30), ("val", 30), ("train", 35), ("train", 40), ("val", 40),
    ]  # fmt: skip
    for xa, xb in zip(lines_a, lines_b, strict=True):
        xa.pop("samples_per_s", None)
        xb.pop("samples_per_s", None)
        assert xa == xb


def test_a_different_seed_gives_different_weights(tmp_path: Path) -> None:
    """Guards the test above against comparing two runs that cannot differ."""
    from nonlocalnet.engine import config_from_dict, train

    cfg = dict(CONFIG, train=dict(CONFIG["train"], steps=6, checkpoint_every=6, eval_every=-1))
    cfg["data"] = dict(CONFIG["data"], num_workers=0)
    train(config_from_dict(cfg), out_dir=tmp_path / "a")
    cfg["train"] = dict(cfg["train"], seed=4)
    train(config_from_dict(cfg), out_dir=tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_starts_from_scratch_and_bad_path_errors(
    tmp_path: Path,
) -> None:
    from nonlocalnet.engine import config_from_dict, train

    cfg = dict(CONFIG, train=dict(CONFIG["train"], steps=2, checkpoint_every=2, eval_every=-1))
    cfg["data"] = dict(CONFIG["data"], num_workers=0)
    out = train(config_from_dict(cfg), out_dir=tmp_path / "run", resume=True)
    assert out["step"] == 2
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        train(
            config_from_dict(cfg), out_dir=tmp_path / "run", resume_from=str(tmp_path / "nope.pt")
        )
