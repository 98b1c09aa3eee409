"""``nonlocalnet demo``: the built-in long-range benchmarks, end to end.

``--task video`` (default): C2D vs NL-C2D on generated clips. ``--task detection``: tiny Mask
R-CNN vs GC and NL Mask R-CNN on the generated detection set that needs context, compared in
COCO box AP.
"""

from __future__ import annotations

import argparse

HELP = (
    "built-in long-range benchmarks: C2D vs NL-C2D on generated clips (--task video), "
    "Mask R-CNN vs GC/NL Mask R-CNN on a generated detection set (--task detection)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nonlocalnet demo``."""
    parser.add_argument(
        "--task",
        choices=("video", "detection"),
        default="video",
        help="which benchmark (default video)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="report folder (default runs/demo, or runs/demo_detection with --task detection)",
    )
    parser.add_argument(
        "--data-root", default=None, help="cache folder of the generated data (default: config)"
    )
    parser.add_argument(
        "--config-dir",
        default=None,
        help="folder with the demo configs (video: demo_c2d.yaml, demo_nl_c2d.yaml; detection: "
        "demo_maskrcnn_tiny.yaml, demo_gc_maskrcnn_tiny.yaml, demo_nl_maskrcnn_tiny.yaml)",
    )
    parser.add_argument(
        "--no-attention", action="store_true", help="skip the attention figure (video)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides for every config (train.steps=100)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its report."""
    if args.task == "detection":
        from nonlocalnet.apps.demo import run_detection_demo

        run_detection_demo(
            args.out or "runs/demo_detection",
            overrides=args.overrides,
            config_dir=args.config_dir,
            data_root=args.data_root,
        )
        return 0
    from nonlocalnet.apps.demo import run_demo

    run_demo(
        args.out or "runs/demo",
        overrides=args.overrides,
        config_dir=args.config_dir,
        data_root=args.data_root,
        attention=not args.no_attention,
    )
    return 0
