"""Checkpoints: atomic writes, weights_only loading, RNG state, load_model, safetensors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nonlocalnet.engine import config_from_dict, config_to_dict, train
from nonlocalnet.engine.checkpoint import (
    atomic_write,
    capture_rng_state,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_00000001.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 1})

    def broken(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # temp file removed


def test_latest_checkpoint_ignores_temp_files(tmp_path: Path) -> None:
    for step in (2, 10, 4):
        save_checkpoint(tmp_path / f"checkpoint_{step:08d}.pt", {"model": {}, "step": step})
    (tmp_path / ".checkpoint_00000020.pt.abc.tmp").write_bytes(b"half-written")
    (tmp_path / "checkpoint_latest.pt").write_bytes(b"not ours")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_00000010.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("arbitrary code ran",))


def test_loading_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload()}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(path)
    other = tmp_path / "list.pt"
    torch.save([1, 2], other)
    with pytest.raises(ValueError, match="expected a dict with a 'model' entry, got list"):
        load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_checkpoint(tmp_path / "nothing")


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"model": {}, "rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


TOY = {
    "model": {"name": "toy:toy_video", "kwargs": {"norm": True, "width": 4}},
    "data": {
        "task": "video",
        "format": "toy:datasets",
        "num_classes": 3,
        "num_frames": 2,
        "train_crop": 6,
        "kwargs": {"num_samples": 8},
        "num_workers": 0,
    },
    "train": {
        "steps": 3,
        "batch_size": 2,
        "checkpoint_every": 2,
        "eval_every": -1,
        "progress": False,
    },
}


def test_training_checkpoint_contents_and_load_model(tmp_path: Path) -> None:
    config = config_from_dict(TOY)
    train(config, out_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint_00000002.pt" in names and "checkpoint_00000003.pt" in names
    assert {"config.yaml", "metrics.jsonl", "model.safetensors", "final_metrics.json"} <= set(names)
    # Plain types only: torch.load with weights_only=True reads everything.
    state = torch.load(tmp_path / "checkpoint_00000003.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "step", "rng", "sampler", "config"}
    assert state["step"] == 3
    assert state["config"] == config_to_dict(config)
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["offset"] == 6

    model, cfg = load_model(tmp_path / "checkpoint_00000003.pt")
    assert not model.training
    assert cfg["model"]["name"] == "toy:toy_video" and cfg["data"]["num_classes"] == 3
    weights = load_file(str(tmp_path / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
        assert torch.equal(value, state["model"][key]), key


def test_load_model_rebuilds_a_zoo_model(tmp_path: Path) -> None:
    from nonlocalnet.models import create_model

    model = create_model("nl_c2d_tiny", num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    config = config_to_dict(config_from_dict({"model": {"name": "nl_c2d_tiny"},
                                              "data": {"num_classes": 5}}))  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": config})
    loaded, cfg = load_model(tmp_path / "m.pt")
    assert cfg["model"]["name"] == "nl_c2d_tiny"
    x = torch.randn(1, 3, 4, 16, 16)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_export_safetensors_handles_shared_tensors(tmp_path: Path) -> None:
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.ModuleDict({"a": lin, "b": lin})  # tied weights
    export_safetensors(model, tmp_path / "w.safetensors")
    w = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(w["a.weight"], lin.weight) and torch.equal(w["b.weight"], lin.weight)
