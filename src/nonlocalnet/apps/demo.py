"""The built-in long-range benchmarks, end to end (``nonlocalnet demo``): C2D vs NL-C2D on
generated clips (:func:`run_demo`), and Mask R-CNN vs GC and NL Mask R-CNN on the generated
detection set that needs context (:func:`run_detection_demo`, ``--task detection``).

What it does, through the project's own pieces:

1. generates the data set once (:mod:`nonlocalnet.data.synthetic`; mp4 files and ``<path> <label>``
   list files, cached under ``--data-root`` by a hash of the generator parameters and seed);
2. trains a tiny C2D and the same network with non-local blocks under the same budget (same data,
   steps, batch, optimiser, schedule and seed: the two configs may differ only in ``model``) with
   :func:`nonlocalnet.engine.train.train`; the data package decodes the mp4 files in DataLoader
   workers;
3. evaluates both on the held-out clips with the multi-view protocol (``eval.num_clips`` clips ×
   ``eval.num_crops`` crops, softmax averaged per video), the training loop's final evaluation;
4. writes ``metrics.json``, ``learning_curves.png`` (training loss and held-out top-1 against the
   step), an attention figure of the NL model (arrows from a query on the late cue to its most
   attended positions, as in the NL paper's Figure 3) and prints the comparison table.

The configs are ``demo_c2d.yaml`` and ``demo_nl_c2d.yaml``, shipped in the package
(``nonlocalnet/configs``; ``configs/`` of a checkout is the same folder), or taken from
``config_dir``; ``key=value`` overrides apply to both. The data
section names the generator parameters (``format: synthetic``); once generated, the demo points
both runs at the generated ``train.txt`` / ``val.txt`` (the ``list`` format of real data) with the
data package's in-memory frame cache, so each worker decodes a clip once and the later epochs do
not decode again.

Why the NL block of the demo uses the Gaussian pairwise function: with the embedded Gaussian and
the official initialisation (θ and φ drawn with std 0.01), θ(x_i)·φ(x_j) starts near zero and the
bilinear form is learned one direction at a time; under SGD the held-out accuracy stalls on
plateaus at exactly the accuracies of comparing only one colour "bit" across the gap (80% for 6
colours, 83% for 3), and a few hundred steps are not enough to leave them (see
``benchmarks/RESULTS.md``, section 5). The Gaussian f = exp(x_i·x_j) has no θ/φ to grow and leaves the
plateaus much sooner; 1000 steps leave margin (at 600 steps one run reached 100%, another stalled
at 88% on the plateau where the three reddish colours look alike).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nonlocalnet.data import VideoReader
from nonlocalnet.data.synthetic import (
    CLASSES,
    SyntheticVideoSpec,
    generate_video_dataset,
    read_video_metadata,
)
from nonlocalnet.engine.build import build_datasets, build_model
from nonlocalnet.engine.checkpoint import latest_checkpoint, load_model
from nonlocalnet.engine.config import CONFIG_DIR, Config, config_to_dict, load_config
from nonlocalnet.engine.train import train
from nonlocalnet.viz.attention import (
    attention_blocks,
    attention_figure,
    pixel_to_position,
    query_attention,
)
from nonlocalnet.viz.geometry import trace_geometry

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIGS",
    "DETECTION_CONFIGS",
    "DETECTION_TARGETS",
    "TARGETS",
    "attention_on_early_cue",
    "load_demo_configs",
    "measure_loading",
    "run_demo",
    "run_detection_demo",
]

logger = logging.getLogger(__name__)

#: model key in metrics.json -> config file name.
DEFAULT_CONFIGS = {"c2d": "demo_c2d.yaml", "nl_c2d": "demo_nl_c2d.yaml"}

#: what the demo must show (held-out top-1 as fractions: NL-C2D well above chance, C2D at
#: chance) and its run time on a quiet 2-core machine.
TARGETS = {"nl_c2d_top1_min": 0.90, "c2d_top1_max": 0.65, "total_time_s_max": 600.0}


def _find_config(name: str, config_dir: str | Path | None) -> Path:
    path = Path(config_dir if config_dir is not None else CONFIG_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(f"demo config {name!r} not found in {str(path.parent)!r}")
    return path


def _budget(config: Config) -> dict[str, Any]:
    """Everything but the model: must be equal for a fair comparison."""
    d = config_to_dict(config)
    d.pop("model")
    d["train"].pop("out_dir")
    return d


def load_demo_configs(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    names: dict[str, str] | None = None,
    data_format: str = "synthetic",
) -> dict[str, Config]:
    """The configs of a demo (default: the video demo's two) with ``overrides`` applied to all.

    Args:
        overrides: ``key=value`` overrides for every config.
        config_dir: folder of the config files (default: the package's).
        data_root: cache folder of the generated data (default: the configs' ``data.root``).
        names: model key → config file name (default :data:`DEFAULT_CONFIGS`).
        data_format: the generated data's ``data.format`` every config must have.

    Raises:
        ValueError: the configs differ in anything but their ``model`` section (and run dir), or
            the data format is not ``data_format``.
    """
    configs = {
        key: load_config(_find_config(name, config_dir), overrides)
        for key, name in (names or DEFAULT_CONFIGS).items()
    }
    for key, config in configs.items():
        if config.data.format != data_format:
            raise ValueError(
                f"{key}: data.format must be {data_format!r}, got {config.data.format!r}"
            )
        if data_root is not None:
            config.data.root = str(data_root)
    budgets = {key: _budget(c) for key, c in configs.items()}
    first_key, first = next(iter(budgets.items()))
    for key, budget in budgets.items():
        if budget != first:
            diff = sorted(
                f"{section}.{k}"
                for section in budget
                for k in budget[section]
                if budget[section][k] != first[section].get(k)
            )
            raise ValueError(
                f"demo configs {first_key} and {key} must share data, optimiser, schedule, "
                f"training and evaluation settings; they differ in {', '.join(diff)}"
            )
    return configs


def _use_list_files(config: Config, folder: Path) -> None:
    """Point ``config`` at the generated list files, with the in-memory frame cache on.

    The generated set is small (1536 clips of 8×32×32 take 38 MB), so each DataLoader worker
    decodes a video once and reuses its frames in later epochs; random crops and flips are still
    drawn per sample. The ``list`` format is the one real data sets use.
    """
    config.data.format = "list"
    config.data.root = str(folder)
    config.data.train_split = "train.txt"
    config.data.val_split = "val.txt"
    config.data.kwargs = {"cache_frames": True}


def measure_loading(config: Config, num_samples: int = 32) -> dict[str, float]:
    """Time loading training samples in this process (no workers), cold and from the cache.

    Returns:
        ``decode_ms_per_clip`` (first read: PyAV decoding + transform),
        ``cached_ms_per_clip`` (second read: transform of the cached frames) and both per batch
        (× ``train.batch_size``).
    """
    train_set, _ = build_datasets(config, val=False)
    n = min(num_samples, len(train_set) - 1)
    train_set[n]  # first call: imports and decoder set-up
    result = {}
    for name in ("decode", "cached"):
        start = time.perf_counter()
        for i in range(n):
            train_set[i]
        per_clip = (time.perf_counter() - start) / n
        result[f"{name}_ms_per_clip"] = 1e3 * per_clip
        result[f"{name}_ms_per_batch"] = 1e3 * per_clip * config.train.batch_size
    return result


def _read_curves(run_dir: Path, metric: str = "top1", scale: float = 0.01) -> dict[str, list]:
    """``{"loss": [[step, loss]...], "val_<metric>": [[step, value x scale]...]}`` of a run."""
    curves: dict[str, list[list[float]]] = {"loss": [], f"val_{metric}": []}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train" and "loss" in record:
            curves["loss"].append([record["step"], record["loss"]])
        elif record.get("split") == "val" and metric in record:
            curves[f"val_{metric}"].append([record["step"], record[metric] * scale])
    return curves


def plot_curves(models: dict[str, dict[str, Any]], path: Path, chance: float) -> Path:
    """Training loss and held-out top-1 against the step, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, m in models.items():
        loss = m["curves"]["loss"]
        acc = m["curves"]["val_top1"] + [[m["steps"], m["top1"]]]
        if loss:
            ax_loss.plot(*zip(*loss, strict=True), label=key)
        ax_acc.plot(*zip(*acc, strict=True), marker="o", label=key)
    ax_loss.set(xlabel="step", ylabel="training loss (cross-entropy)", title="training loss")
    ax_acc.axhline(chance, color="grey", linestyle="--", label="chance")
    ax_acc.set(xlabel="step", ylabel="held-out top-1 (multi-view)", ylim=(0, 1.02))
    ax_acc.set_title("held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attention_on_early_cue(
    pixels: torch.Tensor,
    weights: torch.Tensor,
    early: tuple[int, int],
    cue_frames: int,
    radius: float,
) -> float:
    """Share of attention weight on keys whose pixel centre lies on the early cue.

    Args:
        pixels: ``(M, 3)`` key centres ``(t, y, x)`` in input pixels.
        weights: ``(M,)`` attention weights of one query (summing to 1).
        early: the early cue's centre ``(y, x)``.
        cue_frames: the early cue is in frames ``[0, cue_frames)``.
        radius: distance in pixels within which a key counts as on the cue.
    """
    t, y, x = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    near = (t < cue_frames) & ((y - early[0]) ** 2 + (x - early[1]) ** 2 <= radius**2)
    return float(weights[near].sum() / weights.sum())


def _attention_figure(
    run_dir: Path,
    out_dir: Path,
    data_folder: Path,
    spec: Any,
    config: Config,
    num_clips: int = 64,
) -> dict[str, Any]:
    """Arrows from the late cue of a held-out 'same' clip; attention share on the early cue.

    Returns:
        The figure paths and, per class and block, the mean share of the attention of the late
        cue's query that lands on the early cue (``uniform_...``: the share uniform attention would
        give, i.e. the fraction of keys on the early cue).
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    model, _ = load_model(path)
    model.eval()
    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError("the NL model has no attention block to draw")
    meta = read_video_metadata(data_folder)["val"]
    # The whole frames, normalised as in training (the network is fully convolutional), so that
    # query and key pixels are those of the metadata.
    mean = torch.tensor(config.data.mean).view(3, 1, 1, 1)
    std = torch.tensor(config.data.std).view(3, 1, 1, 1)
    t_last = spec.frames - 1
    shares: dict[str, dict[str, list[float]]] = {c: {n: [] for n, _ in blocks} for c in CLASSES}
    uniform: dict[str, list[float]] = {name: [] for name, _ in blocks}
    figure: dict[str, Any] = {}
    for i in range(min(len(meta), num_clips)):
        m = meta[i]
        frames = _clip_frames(data_folder / m["path"])  # (T, H, W, 3) uint8
        clip = (frames.permute(3, 0, 1, 2).float() / 255 - mean) / std  # (C, T, H, W)
        early, late = m["centres"]
        query = (t_last, late[0], late[1])
        for name, block in blocks:
            inputs, geometries = trace_geometry(model, clip[None], block)
            att = query_attention(
                block, inputs, geometries, [pixel_to_position(geometries[-1], query)]
            )
            centres = att.cells[0].centres()  # (M, 3) key centres (t, y, x) in pixels
            radius = 1.5 * spec.radius
            shares[CLASSES[m["label"]]][name].append(
                attention_on_early_cue(centres, att.rows[0], early, spec.cue_frames, radius)
            )
            flat = torch.ones(len(centres))
            uniform[name].append(
                attention_on_early_cue(centres, flat, early, spec.cue_frames, radius)
            )
        if not figure and m["label"] == 1:
            figs = attention_figure(
                model,
                clip,
                frames=frames.numpy(),
                block_name=blocks[0][0],
                queries=[query],
                k=8,
                out_dir=out_dir,
                model_name="NL-C2D (demo)",
                input_name=f"held-out clip {m['path']} (same colour)",
            )
            figure = {"clip": m["path"], "block": figs.block_name, "paths": figs.paths[0]}
    return {
        "figure": [str(p) for p in figure.get("paths", [])],
        "figure_clip": figure.get("clip"),
        "figure_block": figure.get("block"),
        "query": "centre of the late cue in the last frame",
        "num_clips": len(next(iter(uniform.values()))),
        "attention_on_early_cue": {
            c: {k: sum(v) / len(v) for k, v in per_block.items() if v}
            for c, per_block in shares.items()
        },
        "uniform_attention_on_early_cue": {k: sum(v) / len(v) for k, v in uniform.items() if v},
    }


def _clip_frames(path: Path) -> torch.Tensor:
    with VideoReader(path) as reader:
        return reader.get_frames(list(range(reader.num_frames)))  # (T, H, W, 3)


def _table(models: dict[str, dict[str, Any]], chance: float) -> str:
    rows = [
        f"{'model':<8} {'params':>8} {'held-out top-1':>15} {'train loss':>11} "
        f"{'train time (s)':>15} {'ms/step':>8}"
    ]
    for key, m in models.items():
        rows.append(
            f"{key:<8} {m['params']:>8,} {100 * m['top1']:>14.1f}% {m['final_loss']:>11.3f} "
            f"{m['train_time_s']:>15.1f} {m['step_ms']:>8.1f}"
        )
    rows.append(f"chance: {100 * chance:.0f}%")
    return "\n".join(rows)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    attention: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; return what ``metrics.json`` holds.

    Args:
        out: report folder (``metrics.json``, ``learning_curves.png``, ``attention/``, ``runs/``).
        overrides: ``key=value`` overrides applied to both configs.
        config_dir: folder holding ``demo_c2d.yaml`` and ``demo_nl_c2d.yaml``.
        data_root: cache folder of the generated data (default: the configs' ``data.root``).
        attention: draw the attention figure.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = load_demo_configs(overrides, config_dir=config_dir, data_root=data_root)
    base = next(iter(configs.values()))
    spec = SyntheticVideoSpec(**base.data.kwargs)
    t0 = time.perf_counter()
    cached = (Path(base.data.root) / spec.key() / "metadata.json").is_file()
    folder = generate_video_dataset(base.data.root, spec)
    data_time = time.perf_counter() - t0
    for config in configs.values():
        _use_list_files(config, folder)
    loading = measure_loading(base)

    models: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, Path] = {}
    for key, config in configs.items():
        run_dir = out / "runs" / key
        if run_dir.exists():  # a previous demo's run: start afresh, not from its checkpoints
            shutil.rmtree(run_dir)
        config.train.out_dir = str(run_dir)
        logger.info(
            "demo: training %s (%s) for %d steps", key, config.model.name, config.train.steps
        )
        t0 = time.perf_counter()
        final = train(config, out_dir=run_dir)
        train_time = time.perf_counter() - t0
        curves = _read_curves(run_dir)
        params = sum(p.numel() for p in build_model(config).parameters())
        # median over the logging windows of the time per step (the first window includes the
        # workers' start and the first decoding of each clip)
        per_step = [
            1e3 * config.train.batch_size / r["samples_per_s"]
            for r in _train_records(run_dir)
            if r.get("samples_per_s")
        ]
        step_ms = statistics.median(per_step) if per_step else 1e3 * train_time / config.train.steps
        top1 = final.get("val_top1", final.get("top1"))
        models[key] = {
            "model": config.model.name,
            "model_kwargs": config.model.kwargs,
            "params": params,
            "top1": None if top1 is None else top1 / 100.0,
            "final_loss": final.get("loss", math.nan),
            "steps": config.train.steps,
            "train_time_s": train_time,
            "step_ms": step_ms,
            "curves": curves,
        }
        run_dirs[key] = run_dir

    chance = 0.5
    report: dict[str, Any] = {
        "models": models,
        "data": {
            "folder": str(folder),
            "format": "mp4 (H.264, intra-only) + <path> <label> list files",
            "cached": cached,
            "generation_time_s": data_time,
            "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
            "num_train": spec.num_train,
            "num_val": spec.num_val,
            **loading,
        },
        "chance": chance,
        "protocol": {
            "num_clips": base.eval.num_clips,
            "num_crops": base.eval.num_crops,
            "aggregation": "softmax scores averaged per video",
        },
        "budget": {
            "steps": base.train.steps,
            "batch_size": base.train.batch_size,
            "lr": base.optim.lr,
            "schedule": base.schedule.name,
            "seed": base.train.seed,
        },
        "targets": TARGETS,
    }
    report["learning_curves"] = str(plot_curves(models, out / "learning_curves.png", chance))
    if attention and "nl_c2d" in run_dirs:
        report["attention"] = _attention_figure(
            run_dirs["nl_c2d"], out / "attention", folder, spec, configs["nl_c2d"]
        )
    report["total_time_s"] = time.perf_counter() - t_start
    nl, c2d = models.get("nl_c2d", {}), models.get("c2d", {})
    report["met"] = {
        "nl_c2d_top1": nl.get("top1") is not None and nl["top1"] >= TARGETS["nl_c2d_top1_min"],
        "c2d_top1": c2d.get("top1") is not None and c2d["top1"] <= TARGETS["c2d_top1_max"],
        "total_time_s": report["total_time_s"] <= TARGETS["total_time_s_max"],
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    print(_table(models, chance))
    if "attention" in report:
        att = report["attention"]
        for label, per_block in att["attention_on_early_cue"].items():
            for block, share in per_block.items():
                print(
                    f"attention of the late cue on the early cue ({label} clips, {block}): "
                    f"{share:.3f} (uniform: {att['uniform_attention_on_early_cue'][block]:.3f})"
                )
    print(
        f"targets: NL-C2D >= {TARGETS['nl_c2d_top1_min']:.0%}: {report['met']['nl_c2d_top1']}; "
        f"C2D <= {TARGETS['c2d_top1_max']:.0%}: {report['met']['c2d_top1']}; "
        f"total {report['total_time_s']:.0f} s <= {TARGETS['total_time_s_max']:.0f} s: "
        f"{report['met']['total_time_s']}"
    )
    print(f"report: {out / 'metrics.json'}")
    return report


def _train_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [
        r
        for r in (json.loads(line) for line in path.read_text().splitlines())
        if r.get("split") == "train"
    ]


# ----------------------------------------------------------------------------- detection

#: model key in metrics.json -> config file name of the detection demo (the baseline first).
DETECTION_CONFIGS = {
    "maskrcnn": "demo_maskrcnn_tiny.yaml",
    "gc_maskrcnn": "demo_gc_maskrcnn_tiny.yaml",
    "nl_maskrcnn": "demo_nl_maskrcnn_tiny.yaml",
}

#: what the detection demo must show: the GC and NL models above the baseline in box AP (COCO
#: AP at IoU 0.50:0.95, percent) by at least ``margin_box_ap``, and the run time of the whole
#: comparison on a quiet 2-core machine.
DETECTION_TARGETS = {"margin_box_ap": 5.0, "total_time_s_max": 900.0}


def plot_detection_curves(models: dict[str, dict[str, Any]], path: Path) -> Path:
    """Training loss (the sum of the detector's losses) and held-out box AP against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    for key, m in models.items():
        if m["curves"]["loss"]:
            ax_loss.plot(*zip(*m["curves"]["loss"], strict=True), label=key)
        if m["curves"]["val_bbox_AP"]:
            ax_ap.plot(*zip(*m["curves"]["val_bbox_AP"], strict=True), marker="o", label=key)
    ax_loss.set(xlabel="step", ylabel="training loss (sum of the losses)", title="training loss")
    ax_ap.set(xlabel="step", ylabel="held-out box AP (%)", ylim=(0, 100), title="box AP")
    for ax in (ax_loss, ax_ap):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _detection_table(models: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"{'model':<12} {'params':>8} {'box AP':>7} {'AP50':>6} {'mask AP':>8} "
        f"{'train time (s)':>15} {'ms/step':>8}"
    ]
    for key, m in models.items():
        rows.append(
            f"{key:<12} {m['params']:>8,} {m['box_ap']:>7.1f} {m['box_ap50']:>6.1f} "
            f"{m['mask_ap']:>8.1f} {m['train_time_s']:>15.1f} {m['step_ms']:>8.1f}"
        )
    return "\n".join(rows)


def run_detection_demo(
    out: str | Path = "runs/demo_detection",
    *,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train the tiny Mask R-CNN, GC and NL Mask R-CNN on the generated detection set under one
    budget; compare their held-out COCO box AP; return what ``metrics.json`` holds.

    The set (:mod:`nonlocalnet.data.synthetic_detection`) draws identical grey squares whose
    class is set only by the colour of a disc in a distant corner: a detector that does not
    carry the cue to the objects localises them but names them at chance, which halves its AP.

    Args:
        out: report folder (``metrics.json``, ``learning_curves.png``, ``runs/<model>/``).
        overrides: ``key=value`` overrides applied to every config (``train.steps=100``).
        config_dir: folder holding the configs of :data:`DETECTION_CONFIGS`.
        data_root: cache folder of the generated data (default: the configs' ``data.root``).
        names: model key → config file (default :data:`DETECTION_CONFIGS`; the first is the
            baseline).
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = names or DETECTION_CONFIGS
    configs = load_demo_configs(
        overrides,
        config_dir=config_dir,
        data_root=data_root,
        names=names,
        data_format="synthetic_detection",
    )
    base_key, base = next(iter(configs.items()))
    models: dict[str, dict[str, Any]] = {}
    for key, config in configs.items():
        run_dir = out / "runs" / key
        if run_dir.exists():  # a previous demo's run: start afresh, not from its checkpoints
            shutil.rmtree(run_dir)
        config.train.out_dir = str(run_dir)
        logger.info(
            "demo: training %s (%s) for %d steps", key, config.model.name, config.train.steps
        )
        t0 = time.perf_counter()
        final = train(config, out_dir=run_dir)
        train_time = time.perf_counter() - t0
        per_step = [
            1e3 * config.train.batch_size / r["samples_per_s"]
            for r in _train_records(run_dir)
            if r.get("samples_per_s")
        ]
        models[key] = {
            "model": config.model.name,
            "model_kwargs": config.model.kwargs,
            "params": sum(p.numel() for p in build_model(config).parameters()),
            "box_ap": final.get("val_bbox_AP", math.nan),
            "box_ap50": final.get("val_bbox_AP50", math.nan),
            "box_ap75": final.get("val_bbox_AP75", math.nan),
            "mask_ap": final.get("val_segm_AP", math.nan),
            "final_loss": final.get("loss", math.nan),
            "steps": config.train.steps,
            "train_time_s": train_time,
            "step_ms": statistics.median(per_step)
            if per_step
            else 1e3 * train_time / config.train.steps,
            "curves": _read_curves(run_dir, "bbox_AP", 1.0),
        }
    baseline = models[base_key]["box_ap"]
    report: dict[str, Any] = {
        "models": models,
        "baseline": base_key,
        "data": {
            "format": "synthetic_detection (COCO json + png)",
            "root": base.data.root,
            "spec": dict(base.data.kwargs),
        },
        "budget": {
            "steps": base.train.steps,
            "batch_size": base.train.batch_size,
            "lr": base.optim.lr,
            "schedule": base.schedule.name,
            "milestones": base.schedule.milestones,
            "seed": base.train.seed,
            "threads": base.train.threads or torch.get_num_threads(),
        },
        "metric": "COCO box AP at IoU 0.50:0.95 (percent), pycocotools, held-out images",
        "targets": DETECTION_TARGETS,
    }
    report["learning_curves"] = str(plot_detection_curves(models, out / "learning_curves.png"))
    report["total_time_s"] = time.perf_counter() - t_start
    margin = DETECTION_TARGETS["margin_box_ap"]
    report["met"] = {
        **{
            f"{key}_beats_{base_key}": bool(m["box_ap"] >= baseline + margin)
            for key, m in models.items()
            if key != base_key
        },
        "total_time_s": report["total_time_s"] <= DETECTION_TARGETS["total_time_s_max"],
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    print(_detection_table(models))
    print(
        f"targets: box AP >= {base_key} + {margin:g}: "
        + ", ".join(f"{k}: {v}" for k, v in report["met"].items() if k != "total_time_s")
        + f"; total {report['total_time_s']:.0f} s <= "
        f"{DETECTION_TARGETS['total_time_s_max']:.0f} s: {report['met']['total_time_s']}"
    )
    print(f"report: {out / 'metrics.json'}")
    return report
