"""Training loop pieces: schedules, parameter groups, step-indexed sampling, losses, precise BN,
mixed precision, clipping, skip accounting, tasks (video, image, segmentation), eval CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nonlocalnet.engine import config_from_dict, evaluate, train
from nonlocalnet.engine.optim import param_groups
from nonlocalnet.engine.sampling import EvalBatchSampler, SeededDataset, StepBatchSampler
from nonlocalnet.engine.schedules import lr_factor
from nonlocalnet.engine.step import compute_loss
from nonlocalnet.engine.train import precise_bn
from toy import RandomDataset, ToyClassifier


def _config(**sections: dict[str, Any]) -> Any:
    base: dict[str, dict[str, Any]] = {
        "model": {"name": "toy:toy_video", "kwargs": {"width": 4}},
        "data": {"task": "video", "format": "toy:datasets", "num_classes": 3, "num_frames": 2,
                 "train_crop": 6, "kwargs": {"num_samples": 12}, "num_workers": 0},
        "optim": {"lr": 0.1},
        "train": {"steps": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 4,
                  "progress": False},
        "eval": {"num_clips": 2, "num_crops": 1},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base)


# ----------------------------------------------------------------------------- schedules


def test_step_schedule_by_hand() -> None:
    got = [lr_factor(s, 8, name="step", milestones=[3, 6], gamma=0.1) for s in range(8)]
    assert got == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_and_poly_by_hand() -> None:
    assert lr_factor(0, 10, name="cosine") == pytest.approx(1.0)
    assert lr_factor(5, 10, name="cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, name="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(5, 10, name="cosine", min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(5, 10, name="poly", power=0.9) == pytest.approx(0.5**0.9)
    assert lr_factor(9, 10, name="poly", power=0.9, min_ratio=0.2) == pytest.approx(0.2)


def test_linear_warmup_multiplies_the_schedule() -> None:
    f = [lr_factor(s, 100, name="constant", warmup_steps=4, warmup_factor=0.1) for s in range(6)]
    assert f == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 1.0])
    # on top of a step decay at step 2 (inside the warm-up)
    assert lr_factor(2, 100, name="step", milestones=[2], warmup_steps=4) == pytest.approx(0.055)


def test_param_groups_exempt_norms_and_biases() -> None:
    model = ToyClassifier(3, width=4, dims=3, norm=True, nonlocal_block=True)
    groups = param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert decay == sorted(
        ["conv.weight", "fc.weight", "nonlocal_block.theta.weight", "nonlocal_block.phi.weight",
         "nonlocal_block.g.weight", "nonlocal_block.conv_out.weight"]
    )  # fmt: skip
    assert all(n.endswith("bias") or ".bn." in f".{n}" or "norm" in n for n in no_decay)
    assert "bn.weight" in no_decay and "nonlocal_block.norm.weight" in no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    all_decay = param_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(all_decay) == 1


# ----------------------------------------------------------------------------- sampling


def test_sharded_batches_equal_the_single_process_batch() -> None:
    one = StepBatchSampler(7, 4, seed=5, total_steps=6)
    ranks = [StepBatchSampler(7, 2, seed=5, total_steps=6, rank=r, world_size=2) for r in (0, 1)]
    for step in range(6):
        assert one.batch(step) == ranks[0].batch(step) + ranks[1].batch(step)


def test_every_epoch_is_a_permutation_and_epochs_differ() -> None:
    s = StepBatchSampler(6, 2, seed=0, total_steps=9)
    stream = [i for batch in s for i, _, _ in batch]
    epochs = [stream[0:6], stream[6:12], stream[12:18]]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert [e for batch in s for _, _, e in batch] == [0] * 6 + [1] * 6 + [2] * 6
    seeds = [sd for batch in s for _, sd, _ in batch]
    assert len(set(seeds)) == len(seeds)


def test_restarted_sampler_continues_the_stream() -> None:
    full = list(StepBatchSampler(5, 3, seed=1, total_steps=7))
    resumed = list(StepBatchSampler(5, 3, seed=1, total_steps=7, start_step=4))
    assert resumed == full[4:]
    assert len(resumed) == 3


def test_eval_sampler_pads_and_shards() -> None:
    shards = [list(EvalBatchSampler(5, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert shards == [[[0, 2], [4]], [[1, 3], [0]]]


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone() -> None:
    ds = SeededDataset(RandomDataset("video", num_samples=4, size=4, num_frames=1))
    # The flip is drawn from the global generator, which the wrapper seeds per sample.
    videos = [ds[(1, s, 0)]["video"] for s in range(16)]
    assert any(not torch.equal(videos[0], v) for v in videos)
    assert all(torch.equal(videos[0], v) or torch.equal(videos[0].flip(-1), v) for v in videos)
    assert all(torch.equal(ds[(1, s, 0)]["video"], v) for s, v in enumerate(videos))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[(2, 11, 0)]
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- losses, BN


def test_segmentation_loss_upsamples_ignores_and_adds_aux() -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 4, 4, generator=g)
    aux = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[:, 0] = 255
    loss = compute_loss({"out": out, "aux": aux}, target, task="segmentation", aux_weight=0.4)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
        logp = up.log_softmax(1)
        keep = target != 255
        picked = logp.gather(1, target.clamp(max=2).unsqueeze(1)).squeeze(1)  # (B, H, W)
        return -picked[keep].mean()

    torch.testing.assert_close(loss, ce(out) + 0.4 * ce(aux))
    only = compute_loss(out, target, task="segmentation")
    torch.testing.assert_close(only, ce(out))


def test_precise_bn_is_the_average_of_batch_statistics() -> None:
    model = ToyClassifier(2, width=3, dims=3, norm=True)
    batches = [torch.randn(4, 3, 2, 6, 6) * (i + 1) for i in range(3)]
    feats = [model.conv(b) for b in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3, 4)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)  # unbiased
    model.bn.momentum = 0.1
    model.eval()
    torch.manual_seed(1)
    expected_rng = torch.rand(2)
    torch.manual_seed(1)
    used = precise_bn(model, iter(batches), 3)
    assert used == 3
    torch.testing.assert_close(model.bn.running_mean, mean.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, var.detach(), rtol=1e-5, atol=1e-5)
    assert model.bn.momentum == 0.1 and not model.training
    assert torch.equal(torch.rand(2), expected_rng)


# ----------------------------------------------------------------------------- whole runs


def test_training_learns_and_logs_one_json_line_per_logging_step(tmp_path: Path) -> None:
    config = _config(
        optim={"lr": 0.2, "weight_decay": 0.0},
        train={"steps": 30, "log_every": 5, "checkpoint_every": 30},
        schedule={"name": "cosine", "warmup_steps": 3},
    )
    result = train(config, out_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train_lines] == [5, 10, 15, 20, 25, 30]
    assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
    assert lines[-1]["split"] == "val" and lines[-1]["step"] == 30
    # The class signal is strong: the multi-view evaluation gets every held-out sample right.
    assert result["val_top1"] == 100.0 and result["val_num_samples"] == 12
    assert result["step"] == 30 and result["skipped"] == 0
    assert json.loads((tmp_path / "final_metrics.json").read_text())["val_top1"] == 100.0


def test_lr_follows_the_schedule(tmp_path: Path) -> None:
    config = _config(
        train={"steps": 6, "log_every": 1, "checkpoint_every": 6, "eval_every": -1},
        schedule={"name": "step", "milestones": [2, 4], "gamma": 0.5},
    )
    train(config, out_dir=tmp_path)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_gradient_clipping_bounds_the_first_update(tmp_path: Path) -> None:
    clip = 1e-3
    config = _config(
        optim={"lr": 1.0, "weight_decay": 0.0, "momentum": 0.0, "clip_grad_norm": clip},
        train={"steps": 1, "log_every": 1, "checkpoint_every": 1, "eval_every": -1},
    )
    train(config, out_dir=tmp_path)
    from nonlocalnet.engine import build_model
    from nonlocalnet.engine.checkpoint import load_checkpoint

    torch.manual_seed(config.train.seed)
    before = build_model(config).state_dict()
    after = load_checkpoint(tmp_path / "checkpoint_00000001.pt")["model"]
    delta = torch.cat(
        [(after[k] - before[k]).flatten() for k in before if before[k].is_floating_point()]
    )
    assert delta.norm() == pytest.approx(clip, rel=1e-4)  # lr 1: the step is the clipped gradient
    log = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert log["grad_norm"] > clip  # the unclipped norm is logged


def test_bfloat16_autocast_on_cpu_and_float16_refused(tmp_path: Path) -> None:
    result = train(_config(train={"amp": "bfloat16", "steps": 2}), out_dir=tmp_path / "bf16")
    assert math.isfinite(result["loss"])
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        train(_config(train={"amp": "float16"}), out_dir=tmp_path / "fp16")


def test_image_and_segmentation_tasks(tmp_path: Path) -> None:
    image = _config(model={"name": "toy:toy_image"}, data={"task": "image"}, train={"steps": 2})
    out = train(image, out_dir=tmp_path / "image")
    assert out["val_num_samples"] == 12 and "val_top1" in out
    seg = _config(
        model={"name": "toy:toy_seg", "kwargs": {}},
        data={"task": "segmentation", "train_crop": 8},
        train={"steps": 3, "precise_bn_batches": 2},
    )
    out = train(seg, out_dir=tmp_path / "seg")
    assert len(out["val_per_class_iou"]) == 3
    assert 0.0 <= out["val_mean_iou"] <= 100.0
    # 12 images of 8x8 with the first row ignored
    assert out["val_num_pixels"] == 12 * 7 * 8


def test_too_many_unreadable_videos_stop_the_run(tmp_path: Path, monkeypatch: Any) -> None:
    class Unreadable(RandomDataset):
        def __getitem__(self, index: int) -> dict[str, Any]:
            sample = super().__getitem__(index)
            sample["skipped"] = 1  # one unreadable video replaced by this sample
            return sample

    import sys

    train_module = sys.modules["nonlocalnet.engine.train"]  # the package exports train()

    monkeypatch.setattr(
        train_module,
        "build_datasets",
        lambda config, val=True: (Unreadable("video", num_samples=8, size=6, num_frames=2), None),
    )
    with pytest.raises(RuntimeError, match=r"of \d+ samples \(50\.0%\) could not be read"):
        train(_config(train={"log_every": 1, "eval_every": -1}), out_dir=tmp_path)


def test_evaluate_and_eval_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    config = _config(train={"steps": 2, "checkpoint_every": 2})
    result = train(config, out_dir=tmp_path / "run")
    metrics = evaluate(config, tmp_path / "run")
    assert metrics["top1"] == result["val_top1"]
    again = evaluate(config, tmp_path / "run" / "model.safetensors")
    assert again == metrics

    from nonlocalnet.cli import main
    from nonlocalnet.engine.config import config_to_dict

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(config)))
    code = main(["eval", "--config", str(cfg_file), "--checkpoint", str(tmp_path / "run"),
                 "--json", str(tmp_path / "m.json")])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "m.json").read_text())["top1"] == metrics["top1"]
    assert "top1" in capsys.readouterr().out
    assert main(["eval", "--config", str(cfg_file), "--checkpoint", str(tmp_path / "x")]) == 2
    # Without --config: the config stored in the checkpoint, plus overrides.
    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "eval.max_samples=4",
                 "--json", str(tmp_path / "m4.json")])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "m4.json").read_text())["num_samples"] == 4


def test_tensorboard_events_when_installed(tmp_path: Path, monkeypatch: Any) -> None:
    """tensorboard is not a dependency: a stand-in SummaryWriter receives the logged scalars."""
    import sys
    import types

    calls: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
            # A new run purges nothing (a resumed one: the events after its step).
            assert log_dir == str(tmp_path / "tensorboard") and purge_step is None

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append((tag, value, step))

        def close(self) -> None:
            calls.append(("closed", 0.0, 0))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer)
    )
    train(_config(train={"steps": 2, "log_every": 1, "checkpoint_every": 2}), out_dir=tmp_path)
    tags = [(t, s) for t, _, s in calls]
    assert ("train/loss", 1) in tags and ("train/lr", 2) in tags and ("val/top1", 2) in tags
    assert calls[-1][0] == "closed"
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2]
    ]
    assert [v for t, v, _ in calls if t == "train/loss"] == losses


def test_train_cli_help_and_export_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from nonlocalnet.cli import main
    from nonlocalnet.engine.config import config_to_dict

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume" in capsys.readouterr().out
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(config_to_dict(_config(train={"steps": 1, "eval_every": -1})))
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg_file),
                "--out",
                str(tmp_path / "a"),
                "--no-export-safetensors",
                "optim.lr=0.01",
            ]
        )
        == 0
    )
    assert not (tmp_path / "a" / "model.safetensors").exists()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 1 and printed["lr"] == pytest.approx(0.01)
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01  # the resolved config, overrides applied
