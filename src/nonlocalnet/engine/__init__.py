"""Training and evaluation engine.

Public API::

    from nonlocalnet.engine import load_config, train, evaluate, load_model

    config = load_config("configs/x.yaml", ["optim.lr=0.1", "train.steps=100"])
    metrics = train(config, out_dir="runs/x")          # -> {"step", "loss", "lr", "val_top1", ...}
    metrics = train(config, out_dir="runs/x", resume=True)   # continue a killed run, exactly
    metrics = evaluate(config, "runs/x/checkpoint_00000100.pt")  # -> {"top1", "top5", ...}
    model, config_dict = load_model("runs/x/checkpoint_00000100.pt")

- ``load_config(path, overrides)`` / ``Config``: typed, validated YAML config (engine.config).
- ``train(config, *, resume=False, out_dir=None)``: writes ``config.yaml``,
  ``checkpoint_<step>.pt`` (atomic, every ``train.checkpoint_every`` steps and at the end),
  ``metrics.jsonl`` (one JSON line per logging step, ``"split": "train" | "val"``),
  ``final_metrics.json`` and ``model.safetensors``; returns the final metrics with the
  validation metrics prefixed ``val_``. Accuracies and IoUs are in percent.
- ``evaluate(config, checkpoint)``: video top-1/top-5 (multi-view), image top-1/top-5,
  segmentation ``mean_iou`` / ``per_class_iou``.
- ``build_model(config)`` / ``build_datasets(config)``: what train/evaluate use.
- ``load_model(path) -> (model, config_dict)``: rebuild a checkpoint's model (eval mode).

Works under ``torchrun --nproc_per_node=N`` (DDP, gloo on CPU / nccl on CUDA).
"""

from nonlocalnet.engine.build import build_datasets, build_model
from nonlocalnet.engine.checkpoint import export_safetensors, load_checkpoint, load_model
from nonlocalnet.engine.config import Config, config_from_dict, config_to_dict, load_config
from nonlocalnet.engine.evaluate import evaluate, run_evaluation
from nonlocalnet.engine.train import train

__all__ = [
    "Config",
    "build_datasets",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "export_safetensors",
    "load_checkpoint",
    "load_config",
    "load_model",
    "run_evaluation",
    "train",
]
