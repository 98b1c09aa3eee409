"""Training-step time of NL C2D vs C2D, compared with their multiply-add ratio.

The NL paper reports NL C2D R50 (5 blocks) at about 1.2x the FLOPs of C2D; a fast NL block
should cost about as much time as its multiply-adds say: time ratio <= 1.15 x MAC ratio.

    .venv/bin/python benchmarks/bench_models.py                       # c2d_r50 vs nl_c2d_r50
    .venv/bin/python benchmarks/bench_models.py --repeat 5 --threads 2 --input 3x8x112x112

Prints a markdown table (and one JSON line with --json). Timings are the median of
``--repeat`` steps after ``--warmup`` steps, the two models' steps alternating, each step = zero_grad, forward, loss, backward
(train mode, batch ``--batch``). Multiply-adds are of one forward pass (FlopCounterMode on the
meta device); the backward pass costs about twice the forward for both networks, so the
forward ratio is the step ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from nonlocalnet.models import create_model
from nonlocalnet.models.flops import count_flops


def input_size(text: str) -> tuple[int, ...]:
    """``"3x8x112x112"`` → ``(3, 8, 112, 112)`` (an argparse ``type``)."""
    try:
        size = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3x8x112x112, got {text!r}") from None
    if any(s < 1 for s in size):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return size


def step_times(
    names: list[str], size: tuple[int, ...], *, warmup: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per training step of each model on random input of ``size`` (batch first).

    Steps of the models alternate (a, b, a, b, ...), so a change of the machine's load during
    the run affects both alike.
    """
    torch.manual_seed(0)
    x = torch.randn(size)
    loss_fn = torch.nn.CrossEntropyLoss()
    models = {name: create_model(name).train() for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeat):
        for name, model in models.items():
            target = torch.randint(0, model.fc.out_features, (size[0],))
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), target).backward()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="c2d_r50")
    parser.add_argument("--model", default="nl_c2d_r50")
    parser.add_argument("--input", type=input_size, default="3x8x112x112", help="C x T x H x W")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = (args.batch, *args.input)
    names = [args.base, args.model]
    all_times = step_times(names, size, warmup=args.warmup, repeat=args.repeat)
    rows = {}
    for name in names:
        with torch.device("meta"):
            macs = count_flops(create_model(name), size).macs
        times = all_times[name]
        rows[name] = {
            "macs": macs,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times_s": times,
        }
    base, model = rows[args.base], rows[args.model]
    mac_ratio = model["macs"] / base["macs"]
    time_ratio = model["median_s"] / base["median_s"]
    min_ratio = model["min_s"] / base["min_s"]
    print(
        f"training step, batch {args.batch}, {'x'.join(map(str, args.input))}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| model | GMACs (fwd) | step time (s, median) | min (s) | steps (s) |")
    print("|---|---:|---:|---:|---|")
    for name, r in rows.items():
        steps = ", ".join(f"{t:.2f}" for t in r["times_s"])
        print(
            f"| {name} | {r['macs'] / 1e9:.2f} | {r['median_s']:.2f} | {r['min_s']:.2f} | {steps} |"
        )
    print(
        f"\nMAC ratio {mac_ratio:.3f}, time ratio {time_ratio:.3f}, "
        f"time/MAC ratio {time_ratio / mac_ratio:.3f} (target <= 1.15); "
        f"with the fastest steps: time ratio {min_ratio:.3f}, time/MAC {min_ratio / mac_ratio:.3f}"
    )
    if args.json:
        out = {
            "rows": rows,
            "mac_ratio": mac_ratio,
            "time_ratio": time_ratio,
            "min_ratio": min_ratio,
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
