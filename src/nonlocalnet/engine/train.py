"""``nonlocalnet train``: the training loop (single process or DDP under torchrun).

One iteration: set the lr of the step, forward under optional autocast, loss (CE; segmentation
adds the auxiliary head's loss), backward (with a GradScaler for float16), optional gradient
clipping, SGD step. Every ``log_every`` steps one JSON line of metrics goes to the log and to
``metrics.jsonl`` in the run dir; every ``checkpoint_every`` steps and at the end a checkpoint is
written atomically; at the end the weights are also exported as ``model.safetensors``.

Exact resume: the data order and each sample's augmentation are functions of (seed, step)
(:mod:`nonlocalnet.engine.sampling`), and the checkpoint holds the model, optimiser, schedule,
scaler and every RNG state, so a run killed after a checkpoint and resumed ends with the same
weights as a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nonlocalnet.engine import checkpoint as ckpt
from nonlocalnet.engine.build import build_datasets, build_model, collate_for
from nonlocalnet.engine.config import Config, config_to_dict, load_config, save_config
from nonlocalnet.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from nonlocalnet.engine.optim import build_optimizer
from nonlocalnet.engine.sampling import SeededDataset, StepBatchSampler
from nonlocalnet.engine.schedules import LRSchedule

__all__ = ["HELP", "add_arguments", "compute_loss", "precise_bn", "run", "train"]

logger = logging.getLogger(__name__)

HELP = "train a model from a YAML config (single process, or DDP under torchrun)"


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    """``auto`` → this process's CUDA device when available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} asked for but CUDA is not available")
    return device


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for ``train.amp`` (none / bfloat16 / float16) on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "float16" and device.type != "cuda":
        raise ValueError("train.amp: float16 needs a CUDA device; use bfloat16 on the CPU")
    dtype = torch.bfloat16 if amp == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:  # pragma: no cover
        pass


def split_batch(batch: dict[str, Any], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a batch dict (``video`` or ``image``; ``label``/``mask``)."""
    if not isinstance(batch, dict):
        raise TypeError(f"expected the dataset to yield dicts, got {type(batch).__name__}")
    for key in ("video", "image"):
        if key in batch:
            inputs = batch[key]
            break
    else:
        raise KeyError(f"batch has no 'video' or 'image' entry; keys: {sorted(batch)}")
    for key in ("label", "mask", "target"):
        if key in batch:
            target = batch[key]
            break
    else:
        raise KeyError(f"batch has no 'label' or 'mask' entry; keys: {sorted(batch)}")
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)
    return inputs, target.long()


def compute_loss(
    output: torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, ...],
    target: torch.Tensor,
    *,
    task: str,
    ignore_index: int = 255,
    aux_weight: float = 0.4,
) -> torch.Tensor:
    """Cross-entropy; segmentation: with ``ignore_index``, logits upsampled to the label size,
    plus ``aux_weight`` x the auxiliary head's loss when the model returns one
    (``{"out": ..., "aux": ...}`` or ``(out, aux)``)."""
    aux = None
    if isinstance(output, dict):
        main, aux = output["out"], output.get("aux")
    elif isinstance(output, (tuple, list)):
        main, aux = output[0], (output[1] if len(output) > 1 else None)
    else:
        main = output
    if task != "segmentation":
        return F.cross_entropy(main.float(), target)

    def seg_ce(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(
                logits, size=target.shape[-2:], mode="bilinear", align_corners=False
            )
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)

    loss = seg_ce(main)
    if aux is not None and aux_weight:
        loss = loss + aux_weight * seg_ce(aux)
    return loss


def count_skipped(batch: dict[str, Any]) -> int:
    """Unreadable videos behind a batch: the larger of ``len(batch["unreadable"])`` (paths, which
    include test samples dropped from the batch) and ``sum(batch["skipped"])`` (replacements)."""
    listed = len(batch.get("unreadable") or [])
    replaced = int(torch.as_tensor(batch["skipped"]).sum()) if "skipped" in batch else 0
    return max(listed, replaced)


def make_loader(
    dataset: Dataset,
    batch_sampler: Any,
    *,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    """A DataLoader over a batch sampler with its own seeded generator (so that creating its
    iterator does not draw from the global torch generator)."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        persistent_workers=False,
        collate_fn=collate_fn,
    )


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    num_batches: int,
    *,
    autocast: contextlib.AbstractContextManager | None = None,
) -> int:
    """Recompute BatchNorm running statistics as the plain average over ``num_batches`` batches.

    The model runs in training mode without gradients; BN momentum is set to None (cumulative
    average) for the pass and restored afterwards. The torch RNG (dropout) is forked, so the
    training stream is unchanged. Across processes the statistics are averaged.

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
    with torch.random.fork_rng(devices=[]):
        for inputs in batches:
            with autocast or contextlib.nullcontext():
                model(inputs)
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

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        except ImportError:
            logger.debug("tensorboard not installed: no event files")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, sort_keys=False)
        logger.info(line)
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


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    disable = not enabled or not sys.stderr.isatty() or bool(os.environ.get("CI"))
    return tqdm(total=total, initial=initial, disable=disable, desc="train", dynamic_ncols=True)


def _resolve_resume(resume: bool | str, run_dir: Path) -> Path | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", run_dir)
        return found
    path = Path(resume)
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint_<step>.pt in {str(path)!r}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {str(path)!r} not found")
    return path


# ----------------------------------------------------------------------------- the loop


def train(
    config: Config,
    *,
    resume: bool | str = False,
    out_dir: str | Path | None = None,
    export_safetensors: bool | None = None,
) -> dict[str, Any]:
    """Train ``config``'s model on its data; evaluate at the end.

    Args:
        config: the resolved run config.
        resume: True continues from the latest ``checkpoint_<step>.pt`` of the run dir (from
            scratch if there is none), a path continues from that checkpoint (or that folder's
            latest).
        out_dir: run dir (default ``config.train.out_dir``): ``config.yaml``, checkpoints,
            ``metrics.jsonl``, ``model.safetensors``.
        export_safetensors: override ``config.train.export_safetensors``.

    Returns:
        The final metrics: ``step``, ``loss`` (mean over the last logging window), ``lr``,
        ``skipped`` and the validation metrics (``val_top1``... in percent) unless
        ``train.eval_every`` is -1.
    """
    from nonlocalnet.engine.evaluate import run_evaluation

    dist_info = init_distributed()
    run_dir = Path(out_dir if out_dir is not None else config.train.out_dir)
    device = resolve_device(config.train.device, dist_info)
    tc = config.train
    total = tc.steps
    seed_everything(tc.seed)

    model = build_model(config).to(device)
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
        total,
        name=sc.name,
        milestones=sc.milestones,
        gamma=sc.gamma,
        power=sc.power,
        min_ratio=sc.min_lr / config.optim.lr,
        warmup_steps=sc.warmup_steps,
        warmup_factor=sc.warmup_factor,
    )
    autocast = autocast_context(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda") if tc.amp == "float16" else None

    start_step = 0
    resume_path = _resolve_resume(resume, run_dir)
    rng_state = None
    if resume_path is not None:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves weights to `device`.
        state = ckpt.load_checkpoint(resume_path, map_location="cpu")
        if state.get("config", {}).get("model") != config_to_dict(config)["model"]:
            logger.warning("--resume: the checkpoint's model section differs from the config's")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        rng_state = state.get("rng")
        logger.info("resumed from %s at step %d", resume_path, start_step)

    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    log = MetricsLog(run_dir if dist_info.is_main else None, start_step)

    ddp_model: nn.Module = model
    if dist_info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = StepBatchSampler(
        len(train_set),
        tc.batch_size,
        seed=tc.seed,
        total_steps=total,
        start_step=start_step,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    loader = make_loader(
        SeededDataset(train_set),
        sampler,
        num_workers=config.data.num_workers,
        seed=tc.seed,
        pin_memory=device.type == "cuda",
        collate_fn=collate_for(config),
    )
    if resume_path is not None:
        stored = state.get("sampler") or {}
        current = sampler.state_dict(start_step)
        for key in ("seed", "num_samples", "global_batch"):
            if key in stored and stored[key] != current[key]:
                logger.warning(
                    "--resume: %s was %s in the checkpoint and is %s now: the data order will "
                    "differ from the interrupted run's",
                    key,
                    stored[key],
                    current[key],
                )
    if rng_state is not None:
        ckpt.restore_rng_state(rng_state)  # last: building the model drew from the generators

    def save(step: int) -> None:
        if not dist_info.is_main:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "rng": ckpt.capture_rng_state(),
            "sampler": sampler.state_dict(step),
            "config": config_to_dict(config),
        }
        ckpt.save_checkpoint(run_dir / f"checkpoint_{step:08d}.pt", state)
        for old_step, old in ckpt.list_checkpoints(run_dir)[: -max(tc.keep_checkpoints, 1)]:
            if old_step != step:
                old.unlink(missing_ok=True)
        logger.info("checkpoint written: %s", run_dir / f"checkpoint_{step:08d}.pt")

    def evaluate_now(step: int) -> dict[str, Any]:
        if tc.precise_bn_batches > 0:
            bn_sampler = StepBatchSampler(
                len(train_set),
                tc.batch_size,
                seed=tc.seed + 7919 * (step + 1),
                total_steps=tc.precise_bn_batches,
                rank=dist_info.rank,
                world_size=dist_info.world_size,
            )
            bn_loader = make_loader(
                SeededDataset(train_set),
                bn_sampler,
                num_workers=0,
                seed=tc.seed,
                collate_fn=collate_for(config),
            )
            inputs = (split_batch(b, config.data.task)[0].to(device) for b in bn_loader)
            precise_bn(model, inputs, tc.precise_bn_batches, autocast=autocast)
        with torch.random.fork_rng(devices=[]):
            metrics = run_evaluation(model, val_set, config, dist_info=dist_info, device=device)
        model.train()
        record = {
            "step": step,
            "split": "val",
            **{k: v for k, v in metrics.items() if not isinstance(v, list)},
        }
        log.write(record)
        return metrics

    model.train()
    skipped = torch.zeros(2, dtype=torch.float64)  # (skipped videos, samples loaded)
    window_loss, window_steps = torch.zeros((), dtype=torch.float64), 0
    last: dict[str, Any] = {"step": start_step}
    val_metrics: dict[str, Any] | None = None
    t0 = time.perf_counter()
    bar = _progress(total, start_step, tc.progress and dist_info.is_main)
    try:
        for step, batch in zip(range(start_step, total), loader, strict=False):
            schedule.set_step(step)
            inputs, target = split_batch(batch, config.data.task)
            inputs = inputs.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            skipped[0] += count_skipped(batch)
            skipped[1] += len(target)
            with autocast:
                output = ddp_model(inputs)
            loss = compute_loss(
                output,
                target,
                task=config.data.task,
                ignore_index=config.data.ignore_index,
                aux_weight=getattr(model, "aux_weight", tc.aux_weight),
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}; stopping")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = None
            if config.optim.clip_grad_norm > 0:
                grad_norm = float(
                    nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            window_loss += loss.detach().double().cpu()
            window_steps += 1
            done = step + 1
            bar.update(1)

            if done % tc.log_every == 0 or done == total:
                stats = torch.cat([window_loss.view(1) / window_steps, skipped.clone()])
                all_reduce_mean(stats[:1])
                all_reduce_sum(stats[1:])
                elapsed = time.perf_counter() - t0
                last = {
                    "step": done,
                    "split": "train",
                    "loss": float(stats[0]),
                    "lr": schedule.get_last_lr()[0],
                    "samples_per_s": window_steps
                    * tc.batch_size
                    * dist_info.world_size
                    / max(elapsed, 1e-9),
                    "skipped": int(stats[1]),
                }
                if grad_norm is not None:
                    last["grad_norm"] = grad_norm
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.3g}")
                seen = float(stats[1] + stats[2])
                if seen and float(stats[1]) / seen > config.data.max_skip_fraction:
                    raise RuntimeError(
                        f"{int(stats[1])} of {int(seen)} videos could not be decoded, more than "
                        f"data.max_skip_fraction={config.data.max_skip_fraction}; see the log "
                        f"for their paths"
                    )
                window_loss.zero_()
                window_steps = 0
                t0 = time.perf_counter()
            # Evaluate before checkpointing: precise BN changes the running statistics, and a
            # run resumed from this checkpoint must continue from the same state.
            final_eval = done == total and tc.eval_every >= 0 and val_set is not None
            if final_eval or (tc.eval_every > 0 and done % tc.eval_every == 0):
                val_metrics = evaluate_now(done)
                t0 = time.perf_counter()
            if done % tc.checkpoint_every == 0 or done == total:
                save(done)
    finally:
        bar.close()

    if start_step == total:
        logger.info("run already complete at step %d", total)
    result: dict[str, Any] = {k: v for k, v in last.items() if k != "split"}
    result["step"] = total
    total_skipped = all_reduce_sum(skipped.clone())
    result["skipped"] = int(total_skipped[0])
    if total_skipped[0] > 0:
        logger.warning("%d videos were skipped (unreadable) during training", int(total_skipped[0]))
    if tc.eval_every >= 0 and val_set is not None:
        if val_metrics is None:  # resumed from the final checkpoint: nothing was trained
            val_metrics = evaluate_now(total)
        result.update({f"val_{k}": v for k, v in val_metrics.items()})
    export = tc.export_safetensors if export_safetensors is None else export_safetensors
    if export and dist_info.is_main:
        ckpt.export_safetensors(model, run_dir / "model.safetensors")
    if dist_info.is_main:
        (run_dir / "final_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    log.close()
    barrier()
    return result


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.1"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint of the run dir (or from CHECKPOINT)",
    )
    parser.add_argument("--out", default=None, help="run dir (default: train.out_dir)")
    parser.add_argument(
        "--export-safetensors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write model.safetensors at the end (default: train.export_safetensors)",
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    result = train(
        config, resume=args.resume, out_dir=args.out, export_safetensors=args.export_safetensors
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    from nonlocalnet.engine.distributed import cleanup_distributed

    cleanup_distributed()
    return 0
