"""The training loop (single process, or DDP under torchrun).

One iteration: set the lr of the step, forward under optional autocast, loss (CE; segmentation
adds the auxiliary head's loss; detection: the sum of the detector's loss dict, each logged),
backward (with a GradScaler for float16), optional gradient clipping, SGD step (over the
parameters that require gradients: a detector's frozen stem and res2 are left out). Every
``log_every`` steps one JSON line of metrics goes to the log and to ``metrics.jsonl`` in the
run dir; every ``checkpoint_every`` steps and at the end a checkpoint is written atomically;
at the end the weights are also exported as ``model.safetensors``.

Exact resume: the data order and each sample's augmentation are functions of (seed, step)
(:mod:`nonlocalnet.engine.sampling`), and the checkpoint holds the model, optimiser, schedule,
scaler, the skip counts and every process's RNG states, so a run killed after a checkpoint and
resumed (with as many processes) ends with the same weights as a run that was never
interrupted. A run stopped by a signal skips an evaluation due at its last step and says so in
its checkpoint; the resumed run evaluates first. Resuming at step s removes the checkpoints of
later steps (a branch the resumed run abandons) and the log records after s.

:func:`train` reads top to bottom: :func:`setup` builds a :class:`Run` (model, optimiser,
schedule, data), :func:`restore` continues it from a checkpoint, :func:`train_step` runs one
iteration, :func:`log_window` writes the metrics of the last logging window,
:func:`evaluate_run` evaluates and :func:`save` writes a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nonlocalnet.data.samples import SkipTracker
from nonlocalnet.engine import checkpoint as ckpt
from nonlocalnet.engine.build import build_datasets, build_model, collate_for
from nonlocalnet.engine.config import (
    RESUMABLE_KEYS,
    Config,
    config_diff,
    config_to_dict,
    save_config,
)
from nonlocalnet.engine.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_mean,
    barrier,
    init_distributed,
)
from nonlocalnet.engine.evaluate import run_evaluation
from nonlocalnet.engine.optim import build_optimizer
from nonlocalnet.engine.sampling import SeededDataset, StepBatchSampler
from nonlocalnet.engine.schedules import LRSchedule
from nonlocalnet.engine.step import (
    autocast_context,
    compute_loss,
    detection_batch,
    make_loader,
    resolve_device,
    seed_everything,
    skip_totals,
    split_batch,
)
from nonlocalnet.engine.stopping import StopRequest, TrainingStopped

__all__ = [
    "MetricsLog",
    "Run",
    "TrainingStopped",
    "check_run_dir",
    "evaluate_run",
    "init_weights",
    "log_window",
    "precise_bn",
    "prepare_run_dir",
    "restore",
    "save",
    "setup",
    "train",
    "train_step",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- BN, log, run folder


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterator[Any],
    num_batches: int,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
    rng_devices: list[torch.device] | None = None,
) -> int:
    """Recompute BatchNorm running statistics as the plain average over ``num_batches`` batches.

    The model runs in training mode without gradients on each batch (a tensor, or a tuple of
    positional inputs: a detector's ``(images, targets)``); BN momentum is set to None
    (cumulative average) for the pass and restored afterwards. The torch RNG (dropout, a
    detector's sampling of anchors and proposals) is forked, the CPU's and ``rng_devices``'
    (the model's CUDA device), so the training stream is unchanged. Across processes the
    statistics are averaged.

    Returns:
        the number of batches used.
    """
    bns = _batch_norms(model)
    if not bns or num_batches <= 0:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    used = 0
    with torch.random.fork_rng(devices=rng_devices or []):
        for inputs in batches:
            with autocast or contextlib.nullcontext():
                model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            used += 1
            if used >= num_batches:
                break
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
        if bn.running_mean is not None:
            all_reduce_mean(bn.running_mean)
            all_reduce_mean(bn.running_var)
    model.train(was_training)
    return used


class MetricsLog:
    """JSON lines to the log and (main process) to ``metrics.jsonl``; TensorBoard when installed."""

    def __init__(self, run_dir: Path | None, start_step: int) -> None:
        self.file = None
        self.writer = None
        self.enabled = run_dir is not None  # only the main process logs
        if run_dir is None:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            # A resumed run rewrites what the killed run logged after its checkpoint.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= start_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue
            path.write_text("".join(k + "\n" for k in kept))
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # Events after the resumed step are the killed run's: purged. Those of the step
            # itself are kept, as its records in metrics.jsonl are (nothing logs them again).
            self.writer = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        except ImportError:
            logger.debug("tensorboard not installed: no event files")

    def write(self, record: dict[str, Any]) -> None:
        """One record: rounded on the console, full precision in ``metrics.jsonl``."""
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=False)
        logger.info(" ".join(f"{k}={_short(v)}" for k, v in record.items()))
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(
                        f"{record.get('split', 'train')}/{key}", value, record["step"]
                    )

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _short(value: Any) -> str:
    """A number as the console shows it: 4 significant digits."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    disable = not enabled or not sys.stderr.isatty() or bool(os.environ.get("CI"))
    return tqdm(total=total, initial=initial, disable=disable, desc="train", dynamic_ncols=True)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a run of this library: ``config.yaml``, ``metrics.jsonl`` or a
    ``checkpoint_<step>.pt``."""
    if not path.is_dir():
        return False
    if (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
        return True
    return bool(ckpt.list_checkpoints(path))


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """The run folder policy: a new run never mixes with files of another run.

    A new run needs an empty (or absent) folder, unless ``overwrite`` (cleared by
    :func:`prepare_run_dir`), which clears only a folder that holds a run
    (:func:`is_run_folder`) or nothing; ``resume`` continues what is there.

    Raises:
        FileExistsError: a new run into a non-empty folder without ``overwrite``; ``overwrite``
            of a folder that holds files but no run.
        ValueError: both ``resume`` and ``overwrite``.
    """
    if resume and overwrite:
        raise ValueError(
            "--resume and --overwrite exclude each other: continue the run or clear it"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"output folder {str(run_dir)!r} is a file")
    if not run_dir.is_dir() or resume or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {str(run_dir)!r} holds another run; continue it with --resume, "
            f"clear it with --overwrite, or choose another --out"
        )
    if not is_run_folder(run_dir):
        raise FileExistsError(
            f"--overwrite: output folder {str(run_dir)!r} holds files but no run (no "
            f"config.yaml, metrics.jsonl or checkpoint_<step>.pt): not cleared; choose another --out"
        )


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume_step: int | None = None) -> None:
    """Create the run folder (cleared first with ``overwrite``), remove the temp files of a
    write that was killed midway and, resuming at ``resume_step``, the checkpoints of later
    steps (the branch the resumed run abandons, which a later ``--resume`` would otherwise
    pick). Called once the run is built, so that a run that fails to start leaves the folder as
    it was."""
    if overwrite and run_dir.is_dir():
        logger.warning("--overwrite: clearing %s", run_dir)
        for child in run_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_temp_files(run_dir)
    if resume_step is None:
        return
    later = [(s, p) for s, p in ckpt.list_checkpoints(run_dir) if s > resume_step]
    for _, path in later:
        path.unlink(missing_ok=True)
    if later:
        logger.warning(
            "resumed at step %d: removed the checkpoints of later steps %s",
            resume_step,
            ", ".join(str(s) for s, _ in later),
        )


def _resolve_resume(resume: bool, resume_from: str | Path | None, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from: ``resume_from`` (a file, or a folder's latest), the
    run folder's latest with ``resume``, or None."""
    if resume_from is not None:
        path = Path(resume_from)
        if path.is_dir():
            found = ckpt.latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"--resume-from: no checkpoint_<step>.pt in {str(path)!r}")
            path = found
        elif not path.is_file():
            raise FileNotFoundError(f"--resume-from: checkpoint {str(path)!r} not found")
        own = path.resolve().parent
        if run_dir.is_dir() and any(run_dir.iterdir()) and run_dir.resolve() != own:
            raise FileExistsError(
                f"--resume-from: output folder {str(run_dir)!r} holds another run; continue "
                f"{str(path)!r} into its own folder {str(own)!r} or into an empty --out"
            )
        return path
    if not resume:
        return None
    found = ckpt.latest_checkpoint(run_dir)
    if found is None:
        logger.warning("--resume: no checkpoint in %s; starting from step 0", run_dir)
    return found


# ----------------------------------------------------------------------------- a run


@dataclass
class Run:
    """Everything a training run holds: built by :func:`setup`, advanced by :func:`train_step`.

    Attributes:
        config: the resolved config.
        run_dir: the run folder.
        dist_info: rank and world size.
        device: where the model runs.
        model: the model (unwrapped).
        ddp_model: the model the steps call (DistributedDataParallel under torchrun).
        optimizer: SGD.
        schedule: the lr schedule, set per step.
        scaler: the float16 gradient scaler, or None.
        train_set: the training dataset.
        val_set: the validation dataset, or None.
        sampler: the step-indexed batch sampler (exact resume).
        loader: the training DataLoader.
        autocast: the autocast context of ``train.amp``.
        skips: unreadable-sample accounting of this process.
        start_step: the step the run starts (or resumes) at.
        rng_state: this process's RNG states from the checkpoint, restored last by :func:`train`.
        stored_sampler: the sampler's position stored in the checkpoint.
        pending_eval: the checkpoint's run stopped before the evaluation due at its step.
        stored_metrics: the ``train`` / ``val`` metrics the checkpoint's run had at its step.
        loss_parts: detection: the sum over the logging window of each loss of the detector
            (on the device).
    """

    config: Config
    run_dir: Path
    dist_info: DistInfo
    device: torch.device
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: Any
    train_set: Dataset
    val_set: Dataset | None
    sampler: StepBatchSampler
    loader: DataLoader
    autocast: contextlib.AbstractContextManager
    skips: SkipTracker
    start_step: int = 0
    rng_state: dict[str, Any] | None = field(default=None, repr=False)
    stored_sampler: dict[str, Any] = field(default_factory=dict, repr=False)
    pending_eval: bool = False
    stored_metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    loss_parts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def setup(config: Config, run_dir: Path, dist_info: DistInfo, *, init: bool = True) -> Run:
    """Build the model, optimiser, schedule and data of a run (at step 0).

    Args:
        config: the run's config.
        run_dir: its folder.
        dist_info: this process's rank.
        init: load ``model.init`` into the model (a new run; a resumed one loads its
            checkpoint instead).
    """
    tc = config.train
    device = resolve_device(tc.device, dist_info)
    seed_everything(tc.seed)
    model = build_model(config)
    if init and config.model.init:
        init_weights(model, config)
    model = model.to(device)
    train_set, val_set = build_datasets(config, val=tc.eval_every >= 0)
    optimizer = build_optimizer(
        model,
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        nesterov=config.optim.nesterov,
        decay_norm_and_bias=config.optim.decay_norm_and_bias,
    )
    sc = config.schedule
    schedule = LRSchedule(
        optimizer,
        tc.steps,
        name=sc.name,
        milestones=sc.milestones,
        gamma=sc.gamma,
        power=sc.power,
        min_ratio=sc.min_lr / config.optim.lr,
        warmup_steps=sc.warmup_steps,
        warmup_factor=sc.warmup_factor,
    )
    autocast = autocast_context(tc.amp, device)  # refuses float16 on the CPU
    ddp_model: nn.Module = model
    if dist_info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Run(
        config=config,
        run_dir=run_dir,
        dist_info=dist_info,
        device=device,
        model=model,
        ddp_model=ddp_model,
        optimizer=optimizer,
        schedule=schedule,
        scaler=torch.amp.GradScaler("cuda") if tc.amp == "float16" else None,
        train_set=train_set,
        val_set=val_set,
        sampler=None,  # type: ignore[arg-type]  # set by _make_loader
        loader=None,  # type: ignore[arg-type]
        autocast=autocast,
        skips=SkipTracker(config.data.max_skip_fraction, num_entries=len(train_set)),
    )


def restore(run: Run, path: Path) -> None:
    """Load a checkpoint's model, optimiser, schedule, scaler and skip counts into ``run``.

    The RNG states of this process's rank are kept in ``run.rng_state`` and restored by
    :func:`train` last, after everything that draws from the generators has been built.

    Raises:
        ValueError: the checkpoint is not a training checkpoint, was trained with another
            config (beyond :data:`~nonlocalnet.engine.config.RESUMABLE_KEYS`), is beyond
            ``train.steps``, or ``train.steps`` changed under a cosine or poly schedule.
    """
    # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the device.
    state = ckpt.load_checkpoint(path, map_location="cpu")
    stored = state.get("config")
    current = config_to_dict(run.config)
    if isinstance(stored, dict):
        changed = [k for k in config_diff(stored, current) if k not in RESUMABLE_KEYS]
        if changed:
            raise ValueError(
                f"--resume: checkpoint {str(path)!r} was trained with another config: "
                f"{', '.join(changed)} differ (only {', '.join(RESUMABLE_KEYS)} may change "
                f"when resuming; start a new run for the others)"
            )
    missing = [k for k in ("model", "optimizer", "scheduler", "step") if k not in state]
    if missing:
        raise ValueError(
            f"--resume: {str(path)!r} is not a training checkpoint: it has no "
            f"{', '.join(missing)} (weights alone start a new run: model.init)"
        )
    step = int(state["step"])
    if step > run.config.train.steps:
        raise ValueError(
            f"--resume: checkpoint {str(path)!r} is at step {step}, beyond "
            f"train.steps={run.config.train.steps}; raise train.steps to train on"
        )
    stored_steps = (stored.get("train") or {}).get("steps") if isinstance(stored, dict) else None
    schedule = run.config.schedule.name
    steps_changed = stored_steps is not None and stored_steps != run.config.train.steps
    if steps_changed and schedule in ("cosine", "poly"):
        raise ValueError(
            f"--resume: train.steps was {stored_steps} and is {run.config.train.steps}, but the "
            f"{schedule} schedule sets each step's lr from step / train.steps, so every step "
            f"would get another lr than the run was trained with; keep train.steps={stored_steps} "
            f"or start a new run (a step or constant schedule may change it)"
        )
    ckpt.check_state_dict(
        run.model,
        state["model"],
        source=f"checkpoint {str(path)!r}",
        stored_config=stored,
        config=current,
    )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.start_step = step
    rank, world = run.dist_info.rank, run.dist_info.world_size
    if state.get("rng") is not None:
        run.rng_state, _ = ckpt.rank_entry(state["rng"], rank, world, "RNG state")
    if state.get("skips") is not None:
        _restore_skips(run.skips, state["skips"], rank, world)
    run.stored_sampler = state.get("sampler") or {}
    run.pending_eval = bool(state.get("pending_eval", False))
    run.stored_metrics = dict(state.get("metrics") or {})
    logger.info("resumed from %s at step %d", path, run.start_step)


def _restore_skips(skips: SkipTracker, stored: list[Any], rank: int, world_size: int) -> None:
    """This process's skip counts from a checkpoint's per-rank list; written by another number
    of processes, rank 0 takes the combined counts (entries read: the union; unnamed: the sum)
    and the others start from zero, so the totals carry over."""
    current = skips.state()
    shapes = [tuple(t.shape) for t in current]
    if not stored or any([tuple(t.shape) for t in entry] != shapes for entry in stored):
        logger.warning(
            "--resume: the checkpoint's skip counts are for a dataset of another length; "
            "counting from zero"
        )
        return
    if len(stored) == world_size:
        entry = stored[rank]
    elif rank == 0:
        entry = [
            torch.stack([e[0] for e in stored]).amax(0),
            torch.stack([e[1] for e in stored]).amax(0),
            torch.stack([e[2] for e in stored]).sum(0),
        ]
    else:
        return
    for target, value in zip(current, entry, strict=True):
        target.copy_(value)


def init_weights(model: nn.Module, config: Config) -> None:
    """Load ``model.init`` (a pretrained start) into ``model``; log what was loaded, what is
    new and what was dropped."""
    from nonlocalnet.convert import load_pretrained

    m = config.model
    report = load_pretrained(model, m.init, source=m.init_format, **m.init_options)
    logger.info("model.init: %s", report.summary())


def _make_loader(run: Run) -> None:
    """The step-indexed sampler and loader, from ``run.start_step`` on."""
    tc = run.config.train
    run.sampler = StepBatchSampler(
        len(run.train_set),
        tc.batch_size,
        seed=tc.seed,
        total_steps=tc.steps,
        start_step=run.start_step,
        rank=run.dist_info.rank,
        world_size=run.dist_info.world_size,
    )
    run.loader = make_loader(
        SeededDataset(run.train_set),
        run.sampler,
        num_workers=run.config.data.num_workers,
        seed=tc.seed,
        pin_memory=run.device.type == "cuda",
        collate_fn=collate_for(run.config),
    )
    current = run.sampler.state_dict(run.start_step)
    for key in ("seed", "num_samples", "global_batch"):
        if key in run.stored_sampler and run.stored_sampler[key] != current[key]:
            logger.warning(
                "--resume: %s was %s in the checkpoint and is %s now: the data order will "
                "differ from the interrupted run's",
                key,
                run.stored_sampler[key],
                current[key],
            )


def save(
    run: Run,
    step: int,
    *,
    pending_eval: bool = False,
    metrics: dict[str, Any] | None = None,
) -> Path | None:
    """Write ``checkpoint_<step>.pt`` (main process) and prune the old ones; return its path.

    Every process calls it: the RNG states and skip counts of each are gathered (by rank).

    Args:
        run: the run.
        step: the steps done.
        pending_eval: the evaluation due at ``step`` was skipped (the run is stopping); the
            resumed run does it first.
        metrics: ``{"train": the last train record, "val": the validation metrics of this
            step or None}``: what a run resumed from this checkpoint reports without redoing it.

    Raises:
        OSError: no space left on device, naming the last good checkpoint.
    """
    mine = {
        "rng": ckpt.capture_rng_state(run.device),
        "skips": [t.clone() for t in run.skips.state()],
    }
    every = all_gather_object(mine)
    if not run.dist_info.is_main:
        return None
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "step": step,
        "rng": [e["rng"] for e in every],
        "skips": [e["skips"] for e in every],
        "sampler": run.sampler.state_dict(step),
        "pending_eval": pending_eval,
        "metrics": metrics or {"train": None, "val": None},
        "config": config_to_dict(run.config),
    }
    path = run.run_dir / f"checkpoint_{step:08d}.pt"
    try:
        ckpt.save_checkpoint(path, state)
    except (OSError, RuntimeError) as err:
        if not ckpt.is_disk_full(err):
            raise
        last = ckpt.latest_checkpoint(run.run_dir)
        raise OSError(
            28,
            f"no space left on device writing {path}; the last good checkpoint is "
            f"{last if last is not None else 'none (no checkpoint was written)'}",
        ) from None
    keep = max(run.config.train.keep_checkpoints, 1)
    for old_step, old in ckpt.list_checkpoints(run.run_dir)[:-keep]:
        if old_step != step:
            old.unlink(missing_ok=True)
    logger.info("checkpoint written: %s", path)
    return path


def evaluate_run(run: Run, step: int, log: MetricsLog) -> dict[str, Any]:
    """Precise BN (when asked), then the validation metrics; logged as a ``val`` record."""
    config, tc = run.config, run.config.train
    if tc.precise_bn_batches > 0:
        bn_sampler = StepBatchSampler(
            len(run.train_set),
            tc.batch_size,
            seed=tc.seed + 7919 * (step + 1),
            total_steps=tc.precise_bn_batches,
            rank=run.dist_info.rank,
            world_size=run.dist_info.world_size,
        )
        bn_loader = make_loader(
            SeededDataset(run.train_set),
            bn_sampler,
            num_workers=0,
            seed=tc.seed,
            collate_fn=collate_for(config),
        )
        if config.data.task == "detection":  # a detector in training mode needs its targets
            inputs: Iterator[Any] = (detection_batch(b, run.device) for b in bn_loader)
        else:
            inputs = (split_batch(b, config.data.task)[0].to(run.device) for b in bn_loader)
        precise_bn(
            run.model,
            inputs,
            tc.precise_bn_batches,
            autocast=run.autocast,
            rng_devices=_rng_devices(run.device),
        )
    with torch.random.fork_rng(devices=_rng_devices(run.device)):
        metrics = run_evaluation(
            run.model, run.val_set, config, dist_info=run.dist_info, device=run.device
        )
    run.model.train()
    record = {"step": step, "split": "val"}
    record.update({k: v for k, v in metrics.items() if not isinstance(v, list)})
    log.write(record)
    return metrics


def _rng_devices(device: torch.device) -> list[torch.device]:
    """The accelerators whose generators a forked RNG region saves: the run's CUDA device."""
    return [device] if device.type == "cuda" else []


def train_step(
    run: Run, step: int, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One iteration on ``batch``: returns the (detached) loss and the gradient norm if clipped,
    both on the device (read them when logging: one transfer per logging step).

    Raises:
        FloatingPointError: the loss is not finite.
    """
    config = run.config
    run.schedule.set_step(step)
    if config.data.task == "detection":
        loss = _detection_loss(run, batch)
    else:
        inputs, target = split_batch(batch, config.data.task)
        inputs = inputs.to(run.device, non_blocking=True)
        target = target.to(run.device, non_blocking=True)
        run.skips.update(batch, check=False)
        with run.autocast:
            output = run.ddp_model(inputs)
        loss = compute_loss(
            output,
            target,
            task=config.data.task,
            ignore_index=config.data.ignore_index,
            aux_weight=getattr(run.model, "aux_weight", config.train.aux_weight),
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(f"step {step}: loss is {loss.item()}; stopping")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    grad_norm = None
    if config.optim.clip_grad_norm > 0:
        grad_norm = nn.utils.clip_grad_norm_(
            run.model.parameters(), config.optim.clip_grad_norm
        ).detach()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    return loss.detach(), grad_norm


def _detection_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """The sum of a detector's losses on ``batch`` (torchvision: ``model(images, targets)``
    returns ``{"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"[,
    "loss_mask"]}``); each is added to ``run.loss_parts`` (on the device) for the log."""
    images, targets = detection_batch(batch, run.device)
    run.skips.update(batch, check=False)
    with run.autocast:
        losses = run.ddp_model(images, targets)
    if not isinstance(losses, dict) or not losses:
        raise TypeError(
            f"a detection model must return a dict of losses in training mode, got "
            f"{type(losses).__name__}"
        )
    for name, value in losses.items():
        part = value.detach().double()
        run.loss_parts[name] = run.loss_parts[name] + part if name in run.loss_parts else part
    return torch.stack([v.float() for v in losses.values()]).sum()


def log_window(
    run: Run,
    log: MetricsLog,
    done: int,
    mean_loss: torch.Tensor,
    window_steps: int,
    elapsed: float,
    grad_norm: torch.Tensor | float | None,
) -> dict[str, Any]:
    """Write the ``train`` record of the last logging window; fail on too many unreadable reads.

    The window's mean loss and (detection) the mean of each of the detector's losses are
    averaged over processes in one collective and read from the device at once.

    Raises:
        RuntimeError: more than ``data.max_skip_fraction`` of the reads were unreadable.
    """
    tc = run.config.train
    names = sorted(run.loss_parts)  # detection: each loss of the detector
    values = torch.stack(
        [mean_loss.reshape(()).double()]
        + [(run.loss_parts[n] / max(window_steps, 1)).reshape(()).double() for n in names]
    )  # (1 + parts,)
    all_reduce_mean(values)
    loss, *parts = values.cpu().tolist()
    run.loss_parts.clear()
    skipped, reads = skip_totals(run.skips)
    record: dict[str, Any] = {
        "step": done,
        "split": "train",
        "loss": loss,
        "lr": run.schedule.get_last_lr()[0],
        "samples_per_s": window_steps
        * tc.batch_size
        * run.dist_info.world_size
        / max(elapsed, 1e-9),
        "skipped": skipped,
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    record.update(zip(names, parts, strict=True))
    log.write(record)
    run.skips.check_total(skipped, reads)
    return record


# ----------------------------------------------------------------------------- the loop


def _summary(run: Run) -> None:
    """The start-up summary: what is trained on what, where, and where it goes."""
    if not run.dist_info.is_main:
        return
    c = run.config
    params = sum(p.numel() for p in run.model.parameters())
    val = len(run.val_set) if run.val_set is not None else 0
    logger.info(
        "run: %s (%s parameters) on %s: %d training %s, %d validation; device %s, %d threads, "
        "%d process(es); steps %d from %d, batch %d per process; output folder %s",
        c.model.name,
        f"{params:,}",
        c.data.task,
        len(run.train_set),
        {"video": "clips", "detection": "images"}.get(c.data.task, "samples"),
        val,
        run.device,
        torch.get_num_threads(),
        run.dist_info.world_size,
        c.train.steps,
        run.start_step,
        c.train.batch_size,
        run.run_dir.resolve(),
    )


def _stop_requested(run: Run, stop: StopRequest) -> int:
    """The signal that stops the run after this step (agreed by every process), or 0."""
    if not run.dist_info.enabled:
        return stop.signum
    flag = torch.tensor([float(stop.signum)], dtype=torch.float64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def train(
    config: Config,
    *,
    resume: bool = False,
    resume_from: str | Path | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    export_safetensors: bool | None = None,
) -> dict[str, Any]:
    """Train ``config``'s model on its data; evaluate at the end.

    Args:
        config: the resolved run config.
        resume: continue the run in the run folder from its latest ``checkpoint_<step>.pt``
            (from step 0 if it has none). Only :data:`~nonlocalnet.engine.config.RESUMABLE_KEYS`
            may differ from the checkpoint's config.
        resume_from: continue from this checkpoint (or this folder's latest), writing into the
            run folder, which must be the checkpoint's own folder or empty (or absent).
        out_dir: run folder (default ``config.train.out_dir``, relative to the current
            directory): ``config.yaml``, checkpoints, ``metrics.jsonl``, ``model.safetensors``.
            A new run refuses a folder holding files unless ``overwrite``. Resuming at step s
            removes its checkpoints of later steps.
        overwrite: clear the run folder first (only a folder holding a run, or nothing).
        export_safetensors: override ``config.train.export_safetensors``.

    Returns:
        The final metrics: ``step``, ``loss`` (mean over the last logging window), ``lr``,
        ``skipped`` and the validation metrics (``val_top1``... in percent) unless
        ``train.eval_every`` is -1.

    Raises:
        TrainingStopped: SIGINT/SIGTERM arrived; the run stopped after the step it was in, with
            a checkpoint.
        FileExistsError: a new run into a folder holding another run; ``resume_from`` into a
            folder holding another run; ``overwrite`` of a folder that holds no run.
        FloatingPointError: the loss is not finite.
    """
    dist_info = init_distributed()
    run_dir = Path(out_dir if out_dir is not None else config.train.out_dir)
    check_run_dir(run_dir, resume=resume or resume_from is not None, overwrite=overwrite)
    resume_path = _resolve_resume(resume, resume_from, run_dir)
    with _cpu_threads(config.train.threads):
        run = setup(config, run_dir, dist_info, init=resume_path is None)
        if resume_path is not None:
            restore(run, resume_path)
        if dist_info.is_main:
            prepare_run_dir(
                run_dir,
                overwrite=overwrite,
                resume_step=run.start_step if resume_path is not None else None,
            )
            save_config(config, run_dir / "config.yaml")
        barrier()
        log = MetricsLog(run_dir if dist_info.is_main else None, run.start_step)
        try:
            return _train_loop(run, log, export_safetensors)
        finally:
            log.close()


@contextlib.contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``threads`` for the run (0: left as they are), and
    restored after it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(previous)


def _train_loop(run: Run, log: MetricsLog, export_safetensors: bool | None) -> dict[str, Any]:
    """The steps of :func:`train` from ``run.start_step``, the final evaluation and export."""
    tc, dist_info, run_dir = run.config.train, run.dist_info, run.run_dir
    total = tc.steps
    _make_loader(run)
    _summary(run)
    if run.rng_state is not None:
        # last: building the run drew from the generators
        ckpt.restore_rng_state(run.rng_state, run.device)

    run.model.train()
    window_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    window_steps = 0
    last: dict[str, Any] = dict(run.stored_metrics.get("train") or {"step": run.start_step})
    val_metrics: dict[str, Any] | None = None
    can_evaluate = tc.eval_every >= 0 and run.val_set is not None
    t0 = time.perf_counter()
    bar = _progress(total, run.start_step, tc.progress and dist_info.is_main)
    try:
        with StopRequest() as stop, _logging_above(bar):
            if run.pending_eval and can_evaluate:
                # The evaluation the stopped run left for this step, before training on: precise
                # BN changes the statistics the next steps start from.
                logger.info("evaluating step %d, skipped when the run stopped", run.start_step)
                val_metrics = evaluate_run(run, run.start_step, log)
                t0 = time.perf_counter()
            for step, batch in zip(range(run.start_step, total), run.loader, strict=False):
                loss, grad_norm = train_step(run, step, batch)
                window_loss += loss.double()
                window_steps += 1
                done = step + 1
                bar.update(1)
                if done % tc.log_every == 0 or done == total:
                    elapsed = time.perf_counter() - t0
                    last = log_window(
                        run, log, done, window_loss / window_steps, window_steps, elapsed,
                        grad_norm,
                    )  # fmt: skip
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.3g}")
                    window_loss.zero_()
                    window_steps = 0
                    t0 = time.perf_counter()
                # Evaluate before checkpointing: precise BN changes the running statistics, and
                # a run resumed from this checkpoint must continue from the same state. A run
                # asked to stop skips the evaluation (the scheduler's grace period is for the
                # checkpoint) and its checkpoint says so: the resumed run evaluates first.
                signum = _stop_requested(run, stop)
                due = can_evaluate and (
                    done == total or (tc.eval_every > 0 and done % tc.eval_every == 0)
                )
                pending = due and bool(signum)
                step_val = None
                if pending:
                    logger.warning(
                        "stopping: the evaluation of step %d is left to the resumed run", done
                    )
                elif due:
                    val_metrics = step_val = evaluate_run(run, done, log)
                    t0 = time.perf_counter()
                    signum = _stop_requested(run, stop)
                if done % tc.checkpoint_every == 0 or done == total or signum:
                    train_record = last if last.get("split") == "train" else None
                    path = save(
                        run, done, pending_eval=pending,
                        metrics={"train": train_record, "val": step_val},
                    )  # fmt: skip
                if signum and (done < total or pending):
                    raise TrainingStopped(done, signum, path)
    finally:
        bar.close()

    if run.start_step == total:
        logger.info("run already complete at step %d", total)
    result: dict[str, Any] = {k: v for k, v in last.items() if k != "split"}
    result["step"] = total
    result["skipped"] = skip_totals(run.skips)[0]
    if result["skipped"] > 0:
        logger.warning("%d samples were skipped (unreadable) during training", result["skipped"])
    dropped = getattr(run.train_set, "skipped", None)
    if isinstance(dropped, dict) and dropped:  # detection: annotations/images left out when built
        result["data_skipped"] = {str(k): int(v) for k, v in sorted(dropped.items())}
    if can_evaluate:
        if val_metrics is None and run.start_step == total and run.stored_metrics.get("val"):
            # resumed from the final checkpoint: its evaluation is stored (and logged) already
            val_metrics = dict(run.stored_metrics["val"])
        elif val_metrics is None:  # resumed from a final checkpoint that has no evaluation
            val_metrics = evaluate_run(run, total, log)
        result.update({f"val_{k}": v for k, v in val_metrics.items()})
    export = tc.export_safetensors if export_safetensors is None else export_safetensors
    if export and dist_info.is_main:
        ckpt.export_safetensors(run.model, run_dir / "model.safetensors")
    if dist_info.is_main:
        (run_dir / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    barrier()
    return result


def _logging_above(bar: Any) -> contextlib.AbstractContextManager:
    """Log lines printed above the progress bar (tqdm's redirect), not through it."""
    if getattr(bar, "disable", True):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
