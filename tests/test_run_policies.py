"""The run folder and resume policies, the process-group backend, evaluation padding, repeated
signals, shipped config names, ``data.kwargs`` checks and query indices."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from nonlocalnet.engine import config_from_dict, train
from nonlocalnet.engine._datasets import make_dataset
from nonlocalnet.engine.checkpoint import list_checkpoints, load_checkpoint, rank_entry
from nonlocalnet.engine.config import CONFIG_DIR, resolve_config_path
from nonlocalnet.engine.distributed import process_group_backend
from nonlocalnet.engine.sampling import EvalBatchSampler
from nonlocalnet.engine.stopping import REPEAT_WINDOW_S, StopRequest
from test_runs import _cfg as runs_cfg


def _cfg(**sections: dict[str, Any]) -> dict[str, Any]:
    """tests/test_runs.py's toy run, with a checkpoint every 2 steps."""
    return runs_cfg(**{**sections, "train": {"checkpoint_every": 2, **sections.get("train", {})}})


def test_overwrite_clears_only_a_folder_holding_a_run(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not a run")
    with pytest.raises(FileExistsError, match=r"holds files but no run .*not cleared"):
        train(config_from_dict(_cfg(train={"steps": 2})), out_dir=photos, overwrite=True)
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]


def test_resume_from_into_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    train(config_from_dict(_cfg(train={"steps": 4})), out_dir=tmp_path / "a")
    train(config_from_dict(_cfg(train={"steps": 2})), out_dir=tmp_path / "b")
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    with pytest.raises(FileExistsError, match=r"--resume-from: output folder .* holds another"):
        train(
            config_from_dict(_cfg(train={"steps": 6})),
            out_dir=tmp_path / "b",
            resume_from=tmp_path / "a",
        )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before
    # into an empty folder it continues
    result = train(
        config_from_dict(_cfg(train={"steps": 6})),
        out_dir=tmp_path / "c",
        resume_from=tmp_path / "a",
    )
    assert result["step"] == 6


def test_resuming_an_earlier_checkpoint_removes_the_later_ones(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_cfg()), out_dir=out)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
    train(config_from_dict(_cfg()), resume_from=out / "checkpoint_00000002.pt", out_dir=out)
    # the branch from step 2 wrote 4 and 6 again; the old 4 and 6 are gone, not mixed in
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == [2, 4, 6]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    train_steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines]
    assert train_steps == sorted(train_steps) and len(set(train_steps)) == len(train_steps)


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_a_cosine_or_poly_run_cannot_change_its_length_on_resume(
    tmp_path: Path, schedule: str
) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_cfg(train={"steps": 4}, schedule={"name": schedule})), out_dir=out)
    longer = _cfg(train={"steps": 8}, schedule={"name": schedule})
    with pytest.raises(ValueError, match=r"train\.steps was 4 and is 8.*keep train\.steps=4"):
        train(config_from_dict(longer), out_dir=out, resume=True)
    # a step schedule may be extended
    out2 = tmp_path / "step"
    train(config_from_dict(_cfg(train={"steps": 4})), out_dir=out2)
    assert train(config_from_dict(_cfg(train={"steps": 8})), out_dir=out2, resume=True)["step"] == 8


def test_checkpoints_hold_rng_and_skips_per_rank(tmp_path: Path) -> None:
    train(config_from_dict(_cfg(train={"steps": 2})), out_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoint_00000002.pt")
    assert isinstance(state["rng"], list) and len(state["rng"]) == 1
    assert isinstance(state["skips"], list) and len(state["skips"]) == 1
    assert state["pending_eval"] is False
    # an older single-process checkpoint (one dict) reads as rank 0's, with a warning
    entry, same = rank_entry({"a": 1}, 1, 2, "RNG state")
    assert entry == {"a": 1} and not same
    entry, same = rank_entry([{"r": 0}, {"r": 1}], 1, 2, "RNG state")
    assert entry == {"r": 1} and same


def test_a_stop_at_an_evaluation_step_leaves_it_to_the_resumed_run(tmp_path: Path) -> None:
    import importlib

    from nonlocalnet.engine.stopping import TrainingStopped

    train_module = importlib.import_module("nonlocalnet.engine.train")
    cfg = _cfg(train={"steps": 4, "eval_every": 2, "checkpoint_every": 4})
    full = train(config_from_dict(cfg), out_dir=tmp_path / "full")

    real, calls = train_module.train_step, {"n": 0}

    def step_then_signal(run: Any, step: int, batch: Any) -> Any:
        result = real(run, step, batch)
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation of step 2 is due right after this step
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    train_module.train_step = step_then_signal
    try:
        with pytest.raises(TrainingStopped) as stop:
            train(config_from_dict(cfg), out_dir=tmp_path / "stopped")
    finally:
        train_module.train_step = real
    assert stop.value.step == 2
    assert load_checkpoint(stop.value.checkpoint)["pending_eval"] is True
    resumed = train(config_from_dict(cfg), out_dir=tmp_path / "stopped", resume=True)
    assert resumed["val_top1"] == full["val_top1"]
    vals = [line for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
            if '"split": "val"' in line]  # fmt: skip
    assert len(vals) == 2  # steps 2 (done by the resumed run) and 4


def test_process_group_backend() -> None:
    assert process_group_backend(None, cuda=False) == "gloo"
    assert process_group_backend(None, cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu:gloo,cuda:nccl", cuda=True) == "cpu:gloo,cuda:nccl"
    with pytest.raises(ValueError, match=r"expected 'gloo', 'nccl'.*got 'mpi'"):
        process_group_backend("mpi", cuda=False)


def test_eval_sampler_marks_the_padded_repeats() -> None:
    # 5 samples over 2 processes: [0, 2, 4] and [1, 3, 0 (a repeat)]
    a = EvalBatchSampler(5, 2, rank=0, world_size=2)
    b = EvalBatchSampler(5, 2, rank=1, world_size=2)
    assert a.indices == [0, 2, 4] and a.num_padded == 0
    assert b.indices == [1, 3, 0] and b.num_padded == 1
    assert [b.real_count(i) for i in range(2)] == [2, 0]
    assert [a.real_count(i) for i in range(2)] == [2, 1]


def test_a_repeated_signal_within_the_window_is_the_same_request() -> None:
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # as torchrun's agent forwards the terminal's
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT  # still running: not an exit
    assert REPEAT_WINDOW_S > 0


def test_shipped_configs_by_bare_name(tmp_path: Path, monkeypatch: Any) -> None:
    name = sorted(CONFIG_DIR.glob("*.yaml"))[0]
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(name.stem) == name
    assert resolve_config_path(name.name) == name
    local = tmp_path / name.name
    local.write_text("model: {}\n")
    assert resolve_config_path(name.name) == Path(name.name)  # a file there wins
    with pytest.raises(FileNotFoundError, match=r"nor a shipped config of that name"):
        resolve_config_path("no_such_config")
    with pytest.raises(FileNotFoundError, match=r"not found$"):
        resolve_config_path("folder/no_such_config.yaml")


def test_data_kwargs_must_be_keywords_of_the_dataset(tmp_path: Path) -> None:
    base = _cfg(data={"format": "list", "root": str(tmp_path), "train_split": "train.txt"})
    bad = config_from_dict({**base, "data": {**base["data"], "kwargs": {"num_frame": 4}}})
    with pytest.raises(TypeError, match=r"'num_frame' is not a keyword of .*expected one of"):
        make_dataset(bad, "train")
    own = config_from_dict({**base, "data": {**base["data"], "kwargs": {"num_frames": 4}}})
    with pytest.raises(TypeError, match=r"'num_frames' is set from the config's own keys"):
        make_dataset(own, "train")


def test_cpu_rng_state_round_trips() -> None:
    from nonlocalnet.engine.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state("cpu")
    a = torch.rand(3)
    restore_rng_state(state, "cpu")
    assert torch.equal(torch.rand(3), a) and state["cuda"] is None


@pytest.mark.parametrize("queries", [[0.0, 1.5], torch.tensor([1.0]), [True, False]])
def test_query_indices_must_be_integers(queries: Any) -> None:
    from nonlocalnet._checks import query_index

    with pytest.raises(ValueError, match=r"queries must be integer indices"):
        query_index(4, queries)
    assert query_index(4, [3, 1]).tolist() == [3, 1]
    assert query_index(4, torch.tensor([2], dtype=torch.int32)).tolist() == [2]


def test_train_threads_hold_for_the_run_and_are_restored(tmp_path: Path, monkeypatch: Any) -> None:
    import importlib

    train_module = importlib.import_module("nonlocalnet.engine.train")
    seen: list[int] = []
    real = train_module.train_step

    def recording(run: Any, step: int, batch: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(run, step, batch)

    monkeypatch.setattr(train_module, "train_step", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(config_from_dict(_cfg(train={"steps": 2, "threads": 1})), out_dir=tmp_path / "a")
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match=r"train\.threads: expected an integer >= 0, got -1"):
        config_from_dict(_cfg(train={"threads": -1}))
