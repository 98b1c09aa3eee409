"""Runs a user can trust: no mixed or lost runs, clean stops, clear errors, bad data skipped.

Each test names the defect it guards against (what a run did before the policy existed).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nonlocalnet.cli import main, parse
from nonlocalnet.engine import config_from_dict, evaluate, train
from nonlocalnet.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nonlocalnet.engine.config import config_to_dict, load_config

TESTS = Path(__file__).resolve().parent


def _cfg(**sections: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, dict[str, Any]] = {
        "model": {"name": "toy:toy_video", "kwargs": {"width": 4, "norm": True}},
        "data": {"task": "video", "format": "toy:datasets", "num_classes": 3, "num_frames": 2,
                 "train_crop": 6, "kwargs": {"num_samples": 8}, "num_workers": 0},
        "optim": {"lr": 0.05},
        "train": {"steps": 6, "batch_size": 2, "log_every": 2, "checkpoint_every": 3,
                  "eval_every": -1, "progress": False, "keep_checkpoints": 5},
        "eval": {"num_clips": 1, "num_crops": 1},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- 1. never mix


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_cfg()), out_dir=out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match=r"holds another run; continue it with --resume"):
        train(config_from_dict(_cfg(train={"steps": 4})), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    # --overwrite clears the old run: no checkpoint of it survives the pruning
    train(config_from_dict(_cfg(train={"steps": 4, "checkpoint_every": 2})), out_dir=out,
          overwrite=True)  # fmt: skip
    steps = sorted(load_checkpoint(p)["step"] for p in out.glob("checkpoint_*.pt"))
    assert steps == [2, 4]
    with pytest.raises(ValueError, match=r"exclude each other"):
        train(config_from_dict(_cfg()), out_dir=out, resume=True, overwrite=True)


def test_resume_refuses_another_config_naming_the_keys(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_cfg(train={"steps": 3})), out_dir=out)
    changed = _cfg(train={"steps": 6}, optim={"lr": 0.2, "momentum": 0.5})
    with pytest.raises(ValueError, match=r"optim\.lr, optim\.momentum differ"):
        train(config_from_dict(changed), out_dir=out, resume=True)
    # the resumable keys may change: a longer run, other cadences
    more = _cfg(train={"steps": 6, "log_every": 3, "checkpoint_every": 6})
    assert train(config_from_dict(more), out_dir=out, resume=True)["step"] == 6
    with pytest.raises(ValueError, match=r"at step 6, beyond train\.steps=2"):
        train(config_from_dict(_cfg(train={"steps": 2})), out_dir=out, resume=True)


# ----------------------------------------------------------------------------- 2. stop cleanly


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 240
    log = out / "metrics.jsonl"
    while not (
        log.exists()
        and any(json.loads(x)["step"] >= step for x in log.read_text().split("\n") if x)
    ):
        assert proc.poll() is None, "the run ended before it was signalled"
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint(
    tmp_path: Path, signum: int, code: int
) -> None:
    # a slow run (many steps, a checkpoint only at the end) so that the signal lands mid-run
    cfg = _cfg(train={"steps": 400, "log_every": 1, "checkpoint_every": 400},
               data={"num_workers": 1})  # fmt: skip
    config = _write(tmp_path / "c.yaml", cfg)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nonlocalnet.cli", "train", "--config", str(config),
           "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    _wait_for_step(out, proc, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and stopped[0].endswith("--resume"), err[-2000:]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert 3 <= step < 400
    assert load_checkpoint(latest_checkpoint(out))["step"] == step
    # the line says how to continue, and continuing works
    again = stopped[0].split("continue with: ", 1)[1].split()
    assert again[:2] == ["nonlocalnet", "train"] and again[-1] == "--resume"
    assert main([*again[1:-1], "train.steps=" + str(step + 2), "--resume"]) == 0
    assert load_checkpoint(latest_checkpoint(out))["step"] == step + 2


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    import importlib

    from nonlocalnet.engine.stopping import TrainingStopped

    train_module = importlib.import_module("nonlocalnet.engine.train")  # the module, not train()

    cfg = _cfg(train={"steps": 6, "checkpoint_every": 6})
    train(config_from_dict(cfg), out_dir=tmp_path / "full")

    calls = {"n": 0}
    real = train_module.train_step

    def step_then_signal(run: Any, step: int, batch: Any) -> Any:
        result = real(run, step, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step: handled after it
        return result

    train_module.train_step = step_then_signal
    try:
        with pytest.raises(TrainingStopped) as stop:
            train(config_from_dict(cfg), out_dir=tmp_path / "stopped")
    finally:
        train_module.train_step = real
    assert stop.value.step == 2 and stop.value.exit_code == 143
    train(config_from_dict(cfg), out_dir=tmp_path / "stopped", resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 3. temp files, disk


def test_stale_temp_files_are_removed_and_a_full_disk_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_cfg(train={"steps": 3})), out_dir=out)
    stale = out / ".checkpoint_00000006.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    cfg = config_from_dict(_cfg())

    def full(*args: Any, **kwargs: Any) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter"
            ) from err

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError,
        match=r"no space left on device writing .*checkpoint_00000006\.pt; the last good checkpoint is .*checkpoint_00000003\.pt",
    ):
        train(cfg, out_dir=out, resume=True)
    assert not stale.exists()


# ----------------------------------------------------------------------------- 4. the command line


def test_overrides_anywhere_and_resume_takes_no_argument(tmp_path: Path) -> None:
    args = parse(["train", "--config", "c.yaml", "--out", "d", "train.steps=4", "--resume",
                  "optim.lr=0.1"])  # fmt: skip
    assert args.overrides == ["train.steps=4", "optim.lr=0.1"]
    assert args.resume is True and args.resume_from is None and args.out == "d"
    args = parse(["train", "--resume", "train.steps=2000", "--config", "c.yaml"])
    assert args.resume is True and args.overrides == ["train.steps=2000"]
    args = parse(["-v", "train", "--config", "c.yaml", "--resume-from", "x.pt"])
    assert args.verbose and args.resume_from == "x.pt" and not args.resume
    assert parse(["train", "--config", "c.yaml", "-v"]).verbose
    assert not parse(["train", "--config", "c.yaml"]).verbose


def test_a_diverged_run_is_one_line(tmp_path: Path, capsys: Any) -> None:
    cfg = _write(tmp_path / "c.yaml", _cfg(optim={"lr": 1e30}, train={"steps": 3, "log_every": 1}))
    code = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("nonlocalnet train: error: step ")
    assert err[-1].endswith("loss is nan; stopping")
    assert "Traceback" not in "\n".join(err)


# ----------------------------------------------------------------------------- 5. segmentation data


def _seg_folder(root: Path, good: int = 6) -> Path:
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        images, masks = root / split / "images", root / split / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(good):
            rgb = np.full((16, 16, 3), 40 * (i % 3), np.uint8)
            Image.fromarray(rgb).save(images / f"ok{i}.png")
            Image.fromarray(np.full((16, 16), i % 3, np.uint8)).save(masks / f"ok{i}.png")
        # a label outside the classes, a size mismatch, an RGB mask, a corrupt image
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "bad_label.png")
        Image.fromarray(np.full((16, 16), 9, np.uint8)).save(masks / "bad_label.png")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "bad_size.png")
        Image.fromarray(np.zeros((8, 16), np.uint8)).save(masks / "bad_size.png")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "bad_rgb.png")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(masks / "bad_rgb.png")
        (images / "bad_file.png").write_bytes(b"not a png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "bad_file.png")
    return root


def _seg_cfg(root: Path, **train_kw: Any) -> dict[str, Any]:
    return {
        "model": {"name": "toy:toy_seg", "kwargs": {}},
        "data": {"task": "segmentation", "format": "pairs", "root": str(root), "num_classes": 3,
                 "seg_crop": [12, 12], "num_workers": 0, "max_skip_fraction": 0.5},
        "optim": {"lr": 0.05},
        "train": {"steps": 6, "batch_size": 5, "log_every": 2, "checkpoint_every": 6,
                  "progress": False, **train_kw},
        "eval": {"batch_size": 5},
    }  # fmt: skip


def test_bad_segmentation_samples_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _seg_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        result = train(config_from_dict(_seg_cfg(root)), out_dir=tmp_path / "run")
    assert result["step"] == 6 and math.isfinite(result["loss"])
    assert result["skipped"] == 4  # the four bad entries, each counted once
    assert result["val_skipped"] == 4
    for name in ("bad_label", "bad_size", "bad_rgb", "bad_file"):
        assert name in caplog.text
    # past the fraction: the run stops with the counts
    strict = _seg_cfg(root)
    strict["data"]["max_skip_fraction"] = 0.2
    with pytest.raises(RuntimeError, match=r"4 of \d+ samples .* could not be read"):
        train(config_from_dict(strict), out_dir=tmp_path / "strict")


def test_a_batch_of_ignored_pixels_has_zero_loss() -> None:
    from nonlocalnet.engine.step import compute_loss

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = compute_loss({"out": logits, "aux": logits}, target, task="segmentation")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    target[0, 0, 0] = 1  # one counted pixel: the mean over it
    expected = torch.nn.functional.cross_entropy(logits[:1, :, 0, 0], target[:1, 0, 0])
    assert compute_loss(logits, target, task="segmentation", aux_weight=0).item() == pytest.approx(
        expected.item()
    )


# ----------------------------------------------------------------------------- 6. eval guard


def test_eval_stops_on_too_many_unreadable_samples(tmp_path: Path) -> None:
    root = _seg_folder(tmp_path / "data", good=1)
    cfg = _seg_cfg(root, steps=1, eval_every=-1)
    cfg["data"]["max_skip_fraction"] = 1.0
    train(config_from_dict(cfg), out_dir=tmp_path / "run")
    cfg["data"]["max_skip_fraction"] = 0.5
    with pytest.raises(RuntimeError, match=r"4 of 5 samples \(80\.0%\) could not be read"):
        evaluate(config_from_dict(cfg), tmp_path / "run")


# ----------------------------------------------------------------------------- 7. list files


def test_list_files_bom_encoding_and_extra_fields(tmp_path: Path) -> None:
    from nonlocalnet.data.video import parse_list_file

    (tmp_path / "a.mp4").write_bytes(b"")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa.mp4 1\n".encode())
    assert [Path(r.path).name for r in parse_list_file(bom)] == ["a.mp4"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a.mp4 1\nvid\xe9o.mp4 2\n")
    with pytest.raises(ValueError, match=r"latin\.txt:2: not UTF-8 text"):
        parse_list_file(latin)
    extra = tmp_path / "extra.txt"
    extra.write_text("good_01.mp4 1 0\n")
    with pytest.raises(ValueError, match=r"extra\.txt:1: expected '<path> <label>', got 3 fields"):
        parse_list_file(extra)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("my video.mp4 2\n")
    assert parse_list_file(spaced)[0].path.endswith("my video.mp4")


# ----------------------------------------------------------------------------- 8. numbers


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.nan", r"optim\.lr: expected a number in \(0, inf\), got nan"),
        ("optim.lr=.inf", r"optim\.lr: expected a number in \(0, inf\), got inf"),
        ("schedule.warmup_factor=-0.5", r"schedule\.warmup_factor: expected a number in \(0, 1\]"),
        ("optim.weight_decay=-1e-4", r"optim\.weight_decay: expected a number in \[0, inf\)"),
        ("optim.momentum=1.5", r"optim\.momentum"),
        ("data.std=[0.2,0.0,0.2]", r"data\.std\[1\]"),
        ("train.eval_every=-2", r"train\.eval_every"),
    ],
)
def test_impossible_numbers_are_refused(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


# ----------------------------------------------------------------------------- 11. one line


def test_checkpoint_errors_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    train(config_from_dict(_cfg(train={"steps": 2})), out_dir=out)
    other = _cfg(model={"name": "toy:toy_video", "kwargs": {"width": 6, "norm": True}},
                 data={"num_classes": 4})  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"is a toy:toy_video with 3 classes; the config builds toy:toy_video with 4",
    ):
        evaluate(config_from_dict(other), out)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        load_checkpoint(empty)
    weights = tmp_path / "w.pt"
    save_checkpoint(weights, {"model": load_checkpoint(latest_checkpoint(out))["model"],
                              "config": config_to_dict(config_from_dict(_cfg()))})  # fmt: skip
    with pytest.raises(ValueError, match=r"not a training checkpoint: it has no optimizer"):
        train(config_from_dict(_cfg(train={"steps": 4})), out_dir=tmp_path / "r2",
              resume_from=weights)  # fmt: skip
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"is not a readable safetensors file"):
        evaluate(config_from_dict(_cfg()), fake)
    with pytest.raises(ValueError, match=r"train\.device: expected 'auto', 'cpu'"):
        train(config_from_dict(_cfg(train={"device": "nope"})), out_dir=tmp_path / "r3")

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("executed",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, evil)
    cfg = _write(tmp_path / "c.yaml", _cfg())
    assert main(["eval", "--config", str(cfg), "--checkpoint", str(evil)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err
    assert "pickled Python object" in err and "executed" not in err


# ----------------------------------------------------------------------------- 13. console


def test_console_lines_are_rounded_and_the_run_is_summarised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="nonlocalnet.engine.train"):
        train(config_from_dict(_cfg(optim={"lr": 1 / 3})), out_dir=tmp_path / "run")
    text = caplog.text
    assert "run: toy:toy_video (" in text and "8 training clips" in text and "threads" in text
    assert str(tmp_path / "run") in text
    assert "lr=0.3333 " in text or "lr=0.3333\n" in text  # 4 significant digits on the console
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert len(repr(record["lr"])) > 8  # full precision in the JSON lines


# ----------------------------------------------------------------------------- 14. tensorboard


def test_tensorboard_event_file_reads_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config_from_dict(_cfg()), out_dir=tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [2, 4, 6]
    assert [e.value for e in events] == pytest.approx(losses, rel=1e-6)


# ----------------------------------------------------------------------------- 15. configs


def test_configs_inherit_from_base_files(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_cfg()))
    (tmp_path / "child.yaml").write_text(
        "_base_: base.yaml\noptim: {lr: 0.2}\ndata: {flip: false}\n"
    )
    config = load_config(tmp_path / "child.yaml")
    assert config.optim.lr == 0.2 and config.optim.momentum == 0.9  # merged key by key
    assert config.model.name == "toy:toy_video" and config.data.num_frames == 2
    assert config.data.flip is False
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ValueError, match=r"_base_ files include each other"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "typo.yaml").write_text("_base_: base.yaml\noptim: {lrr: 0.2}\n")
    with pytest.raises(ValueError, match=r"optim\.lrr: unknown key"):
        load_config(tmp_path / "typo.yaml")


# ----------------------------------------------------------------------------- 16. predictions


def test_eval_writes_each_samples_prediction_and_the_views(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _cfg(eval={"num_clips": 2, "num_crops": 1})
    train(config_from_dict(cfg), out_dir=tmp_path / "run")
    config = _write(tmp_path / "c.yaml", cfg)
    code = main(["eval", "--config", str(config), "--checkpoint", str(tmp_path / "run"),
                 "--json", str(tmp_path / "m.json"), "--csv", str(tmp_path / "p.csv")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "test views: 2 clips x 1 crops" in printed and "skipped" in printed
    record = json.loads((tmp_path / "m.json").read_text())
    preds = record["predictions"]
    assert [p["index"] for p in preds] == list(range(8))
    assert all(p["path"] == f"random/{p['index']}" and len(p["scores"]) == 3 for p in preds)
    assert all(p["prediction"] == max(range(3), key=p["scores"].__getitem__) for p in preds)
    top1 = 100 * sum(p["prediction"] == p["label"] for p in preds) / len(preds)
    assert record["top1"] == pytest.approx(top1)
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "index,path,label,prediction,scores" and len(rows) == 9
