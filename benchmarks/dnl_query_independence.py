"""GCNet's query-independence analysis of a trained DNL block: the unary term carries the
query-independent part of the map.

    python benchmarks/dnl_query_independence.py [--steps 300] [--threads 2] [--json PATH] [--png PATH]

DNL (Yin et al., ECCV 2020) writes the non-local map as the sum of a *whitened pairwise* term,
softmax_j((q_i − μ_q)ᵀ(k_j − μ_k)·s/τ), and a *unary* term, softmax_j(w_mᵀx_j), the same row for
every query i. GCNet (Cao et al., 2019) observed that the maps of trained NL blocks are nearly
the same for every query: their average cosine distance over pairs of query positions is small.
This script trains the same small network twice, once with a DNL block and once with a plain NL
block (embedded Gaussian), under the same budget, and runs
:func:`nonlocalnet.analysis.query_independence` on

* the DNL block's pairwise term, its unary term and the combined map ω (``attention_map(...,
  term=...)``), and
* the NL block's map,

before training (the freshly initialised networks) and after. Expected: the unary term's
attention distance is 0 (query-independent by construction), the whitened pairwise term's
large (whitening removes the query-independent part: its logits have zero mean over the
queries for every key), the NL map's small (GCNet's observation), and the combined ω between
its two terms. Measured (benchmarks/RESULTS.md): pairwise 0.288, unary 0, ω 0.028, NL 8.8e-6.

Task: the library's long-range benchmark (:mod:`nonlocalnet.data.synthetic`, the video version:
two coloured cues far apart in space and time, label "same colour"), drawn in memory with
:func:`~nonlocalnet.data.synthetic.make_video_sample` (no mp4 files). Network: the tiny C2D of
the demo (``c2d_tiny`` with widths 16-128, 8×32×32 clips) with one block inserted after res3
(``layer2.0``: 32 channels on 4×4×4 = 64 positions, over space-time). Training: a plain loop,
SGD (momentum 0.9, weight decay 1e-4 except on norms and biases), linear warm-up and cosine
decay, random horizontal flips; both networks start from the same backbone weights and see the
same batches. The analysis reads the block's inputs on held-out clips (captured with a forward
pre-hook) in eval mode.

Outputs: a bar chart (``--png``, default ``benchmarks/data/dnl_query_independence.png``), the
numbers as JSON (``--json``, default ``benchmarks/data/dnl_query_independence.json``) and a
table on standard output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocalnet.analysis import query_independence
from nonlocalnet.data.synthetic import SyntheticVideoSpec, make_video_sample
from nonlocalnet.layers.dnl import DisentangledNonLocal3d
from nonlocalnet.layers.layout import AttentionLayout
from nonlocalnet.layers.nonlocal_block import NonLocal3d
from nonlocalnet.models import create_model, insert_blocks

log = logging.getLogger("dnl_query_independence")

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "data" / "dnl_query_independence.json"
DEFAULT_PNG = HERE / "data" / "dnl_query_independence.png"

#: the submodule after which the block runs: res3 (4 frames × 4×4 for 8×32×32 clips).
BLOCK_AFTER = "layer2.0"
#: backbone of the demo's NL-C2D (basic blocks, one per stage).
WIDTHS = (16, 32, 64, 128)
STEM_CHANNELS = 16
#: Kinetics normalisation, as the data package.
MEAN, STD = 0.45, 0.225
#: the maps analysed, in the order of the table and the figure: key → (model, DNL term, label).
MAPS = {
    "dnl_pairwise": ("dnl", "pairwise", "DNL pairwise\n(whitened)"),
    "dnl_unary": ("dnl", "unary", "DNL unary"),
    "dnl_both": ("dnl", "both", "DNL combined ω"),
    "nl": ("nl", None, "NL (embedded\nGaussian)"),
}


@dataclass
class Settings:
    """Budget and sizes of one run (the command-line options)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    num_train: int = 1536
    num_val: int = 256
    num_colours: int = 6
    analysis_clips: int = 64
    num_pairs: int = 2000
    threads: int = 2
    seed: int = 0


class TermView:
    """One term of a DNL block seen as a block of its own by :func:`query_independence`:
    ``attention_map`` returns that term; ``residual`` and ``layout`` are the block's."""

    def __init__(self, block: DisentangledNonLocal3d, term: str) -> None:
        self.block = block
        self.term = term
        self.pairwise = block.pairwise

    def attention_map(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        return self.block.attention_map(x, queries=queries, term=self.term)

    def residual(self, x: Tensor) -> Tensor:
        return self.block.residual(x)

    def layout(self, size: Sequence[int]) -> AttentionLayout:
        return self.block.layout(size)


# -- data --------------------------------------------------------------------------------------


def make_split(spec: SyntheticVideoSpec, split: str, n: int) -> tuple[Tensor, Tensor]:
    """``n`` clips drawn in memory: uint8 ``(n, 3, T, S, S)`` and labels ``(n,)``, balanced."""
    split_id = {"train": 0, "val": 1}[split]
    labels = np.random.default_rng([spec.seed, split_id, 1 << 20]).permutation(
        np.repeat(np.arange(2), n // 2)
    )  # (n,)
    clips = np.empty((n, spec.frames, spec.size, spec.size, 3), dtype=np.uint8)  # (n, T, H, W, 3)
    for i, label in enumerate(labels):
        clips[i], _ = make_video_sample(
            spec, int(label), np.random.default_rng([spec.seed, split_id, i])
        )
    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous()  # (n, 3, T, H, W)
    return video, torch.from_numpy(labels).long()


def to_input(video: Tensor) -> Tensor:
    """uint8 clips to the network's float input, ``(x / 255 − mean) / std``."""
    return (video.float() / 255.0 - MEAN) / STD


# -- models ------------------------------------------------------------------------------------


def build_model(kind: str, seed: int) -> nn.Module:
    """The tiny C2D with a DNL (``kind="dnl"``) or NL (``"nl"``) block after res3.

    The backbone is drawn from ``seed`` before the block, so both kinds share it.
    """
    torch.manual_seed(seed)
    model = create_model(
        "c2d_tiny", num_classes=2, widths=WIDTHS, stem_channels=STEM_CHANNELS, dropout=0.0
    )
    channels = WIDTHS[1]  # basic blocks: res3 outputs its width
    torch.manual_seed(seed + 1)
    if kind == "dnl":
        block: nn.Module = DisentangledNonLocal3d(channels)
    elif kind == "nl":
        block = NonLocal3d(channels, pairwise="embedded_gaussian")
    else:
        raise ValueError(f"kind must be 'dnl' or 'nl', got {kind!r}")
    return insert_blocks(model, {BLOCK_AFTER: block})


def inserted_block(model: nn.Module) -> nn.Module:
    """The block inserted after :data:`BLOCK_AFTER`."""
    return model.get_submodule(BLOCK_AFTER).after


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(model: nn.Module, video: Tensor, labels: Tensor, s: Settings) -> dict[str, Any]:
    """Train ``model`` for ``s.steps`` steps; returns the loss curve and the time taken."""
    opt = torch.optim.SGD(_param_groups(model, s.weight_decay), lr=s.lr, momentum=0.9)

    def lr_factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        t = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    g = torch.Generator().manual_seed(s.seed)
    n = video.shape[0]
    order = torch.randperm(n, generator=g)
    pos, losses = 0, []
    model.train()
    t0 = time.perf_counter()
    for step in range(s.steps):
        if pos + s.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + min(s.batch_size, n)]
        pos += idx.numel()
        x = to_input(video[idx])  # (B, 3, T, H, W)
        flip = torch.rand(idx.numel(), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == s.steps:
            log.info(
                "step %d/%d loss %.4f", step + 1, s.steps, sum(losses[-50:]) / len(losses[-50:])
            )
    return {"seconds": time.perf_counter() - t0, "losses": losses}


@torch.no_grad()
def accuracy(model: nn.Module, video: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    """Held-out top-1 (one view: the whole clip)."""
    model.eval()
    correct = 0
    for i in range(0, video.shape[0], batch_size):
        logits = model(to_input(video[i : i + batch_size]))
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / video.shape[0]


@torch.no_grad()
def block_input(model: nn.Module, video: Tensor) -> Tensor:
    """The inserted block's input on ``video`` (the network in eval mode)."""
    model.eval()
    seen: list[Tensor] = []
    handle = inserted_block(model).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(to_input(video))
    finally:
        handle.remove()
    return seen[0]


def analyse(models: dict[str, nn.Module], video: Tensor, s: Settings) -> dict[str, dict[str, Any]]:
    """query_independence of every map of :data:`MAPS`, on the blocks' inputs for ``video``."""
    out = {}
    for key, (kind, term, _) in MAPS.items():
        model = models[kind]
        x = block_input(model, video)
        block = inserted_block(model).eval()
        view = TermView(block, term) if term is not None else block
        g = torch.Generator().manual_seed(s.seed)
        out[key] = query_independence(view, x, num_pairs=s.num_pairs, generator=g).as_dict()
    return out


# -- the run -----------------------------------------------------------------------------------


def run(s: Settings) -> dict[str, Any]:
    """Draw the data, analyse the fresh networks, train both, analyse again."""
    torch.set_num_threads(s.threads)
    spec = SyntheticVideoSpec(
        num_train=s.num_train, num_val=s.num_val, num_colours=s.num_colours, seed=s.seed
    )
    t0 = time.perf_counter()
    train_video, train_labels = make_split(spec, "train", s.num_train)
    val_video, val_labels = make_split(spec, "val", s.num_val)
    log.info("data: %d + %d clips in %.1f s", s.num_train, s.num_val, time.perf_counter() - t0)
    probe = val_video[: s.analysis_clips]

    models = {kind: build_model(kind, s.seed) for kind in ("dnl", "nl")}
    init = analyse(models, probe, s)
    training, acc = {}, {}
    for kind, model in models.items():
        log.info("training the %s network for %d steps", kind, s.steps)
        training[kind] = train(model, train_video, train_labels, s)
        acc[kind] = accuracy(model, val_video, val_labels)
        log.info("%s: held-out top-1 %.3f", kind, acc[kind])
    trained = analyse(models, probe, s)
    return {
        "settings": asdict(s),
        "model": {
            "backbone": "c2d_tiny",
            "widths": list(WIDTHS),
            "block_after": BLOCK_AFTER,
            "block_input": list(block_input(models["dnl"], probe[:1]).shape[1:]),
            "dnl": inserted_block(models["dnl"]).extra_repr(),
            "nl": inserted_block(models["nl"]).extra_repr(),
        },
        "val_top1": acc,
        "train_seconds": {k: v["seconds"] for k, v in training.items()},
        "final_loss": {k: float(np.mean(v["losses"][-20:])) for k, v in training.items()},
        "attention_distance": {k: v["attention_distance"] for k, v in trained.items()},
        "trained": trained,
        "init": init,
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the distances, trained and at init."""
    out = [
        "| map | attention distance | at init | input distance | output distance |",
        "|---|---|---|---|---|",
    ]
    for key, (_, _, label) in MAPS.items():
        t, i = result["trained"][key], result["init"][key]
        out.append(
            f"| {label.replace(chr(10), ' ')} | {t['attention_distance']:.4g} "
            f"| {i['attention_distance']:.4g} | {t['input_distance']:.4g} "
            f"| {t['output_distance']:.4g} |"
        )
    acc = result["val_top1"]
    out += [
        "",
        f"held-out top-1: DNL {acc['dnl']:.3f}, NL {acc['nl']:.3f} "
        f"({result['settings']['steps']} steps; training {result['train_seconds']['dnl']:.0f} s "
        f"+ {result['train_seconds']['nl']:.0f} s)",
    ]
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of the attention distances (trained, and at init) of every map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(MAPS)
    labels = [MAPS[k][2] for k in keys]
    trained = [result["trained"][k]["attention_distance"] for k in keys]
    init = [result["init"][k]["attention_distance"] for k in keys]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:gray"]
    xs = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    ax.bar(xs - 0.2, init, 0.4, color=colours, alpha=0.35, hatch="//", label="at init")
    bars = ax.bar(xs + 0.2, trained, 0.4, color=colours, label="trained")
    for b, v in zip(bars, trained, strict=True):
        ax.annotate(
            f"{v:.3g}",
            (b.get_x() + b.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("avg. cosine distance between\nattention maps of two queries")
    acc, st = result["val_top1"], result["settings"]
    ax.set_title(
        "Query independence (GCNet's analysis) of a trained DNL block\n"
        f"tiny C2D, block after res3, {st['steps']} steps; held-out top-1 "
        f"DNL {acc['dnl']:.2f}, NL {acc['nl']:.2f}",
        fontsize=9,
    )
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor="lightgray", hatch="//", label="at init"),
        Patch(facecolor="dimgray", label="trained"),
    ]
    ax.legend(handles=handles, fontsize=8)
    d_in = result["trained"]["dnl_both"]["input_distance"]
    ax.text(
        0.99,
        0.80,
        f"input features of the DNL block: {d_in:.3g}",
        transform=ax.transAxes,
        ha="right",
        fontsize=8,
    )
    ax.set_ylim(0, max(max(trained), max(init), 1e-3) * 1.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the table, write the JSON and the figure."""
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, help_ in (
        ("steps", "training steps per network"),
        ("batch_size", "clips per step"),
        ("num_train", "training clips (even)"),
        ("num_val", "held-out clips (even)"),
        ("analysis_clips", "held-out clips the analysis reads"),
        ("num_pairs", "query pairs averaged per map"),
        ("threads", "torch threads"),
        ("seed", "seed of data, weights and batches"),
        ("warmup_steps", "linear warm-up steps"),
        ("num_colours", "palette colours of the cues"),
    ):
        p.add_argument(
            f"--{field.replace('_', '-')}",
            type=int,
            default=getattr(d, field),
            help=f"{help_} (default {getattr(d, field)})",
        )
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the numbers")
    p.add_argument("--png", type=Path, default=DEFAULT_PNG, help="where to write the figure")
    args = p.parse_args(argv)
    s = Settings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        num_train=args.num_train,
        num_val=args.num_val,
        num_colours=args.num_colours,
        analysis_clips=args.analysis_clips,
        num_pairs=args.num_pairs,
        threads=args.threads,
        seed=args.seed,
    )
    for name in ("steps", "batch_size", "analysis_clips", "num_pairs", "threads"):
        if getattr(s, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run(s)
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.png)
    log.info("wrote %s and %s", args.json, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
