"""``nonlocalnet demo``: the built-in long-range benchmark, C2D vs NL-C2D, end to end."""

from __future__ import annotations

import argparse

HELP = "built-in long-range benchmark: train C2D and NL-C2D on generated clips and compare them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet demo``."""
    parser.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    parser.add_argument(
        "--data-root", default=None, help="cache folder of the generated data (default: config)"
    )
    parser.add_argument(
        "--config-dir", default=None, help="folder with demo_c2d.yaml and demo_nl_c2d.yaml"
    )
    parser.add_argument("--no-attention", action="store_true", help="skip the attention figure")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides for both configs (train.steps=100)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its report."""
    from nonlocalnet.apps.demo import run_demo

    run_demo(
        args.out,
        overrides=args.overrides,
        config_dir=args.config_dir,
        data_root=args.data_root,
        attention=not args.no_attention,
    )
    return 0
