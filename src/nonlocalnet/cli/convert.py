"""``nonlocalnet convert``: a checkpoint of another implementation → this library's safetensors.

    nonlocalnet convert --from caffe2 i3d_nonlocal_32x2_IN_pretrain_400k.pkl --out nl_i3d.safetensors
    nonlocalnet convert --from mmaction2 nl_i3d.pth --model nl_i3d_r50 --out out.safetensors \\
        --set pairwise=dot_product

The file holds the converted weights with the model's name and ``create_model`` overrides in its
metadata (and in ``OUT.json`` beside it); ``nonlocalnet.convert.create_model(weights=OUT,
source="nonlocalnet")`` rebuilds the model from them.
"""

from __future__ import annotations

import argparse
import json

from nonlocalnet.cli._args import parse_key_values
from nonlocalnet.convert import SOURCES, convert_state_dict, read_checkpoint, save_converted

HELP = "convert a checkpoint of another implementation (Caffe2, SlowFast, mmaction2, timm, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nonlocalnet convert``."""
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SOURCE",
        help=f"the checkpoint's implementation: {', '.join(SOURCES)}",
    )
    parser.add_argument(
        "input", metavar="IN", help="the checkpoint (.pkl, .pt, .pth, .safetensors)"
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="registered model to convert into (default: the one the checkpoint fits)",
    )
    parser.add_argument("--out", required=True, metavar="OUT.safetensors", help="file to write")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="converter option, e.g. --set pairwise=dot_product --set variant=8x8",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")


def run(args: argparse.Namespace) -> int:
    """Convert, print the mapping table, write the safetensors file and its sidecar JSON."""
    if args.source not in SOURCES:
        raise ValueError(f"--from must be one of {', '.join(SOURCES)}, got {args.source!r}")
    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {args.out!r}")
    options = parse_key_values(args.set)
    state, meta = read_checkpoint(args.input, args.source)
    conversion = convert_state_dict(state, args.source, args.model, meta=meta, **options)
    path = save_converted(conversion, args.out, source=args.source)
    report = conversion.report
    if args.json:
        print(json.dumps({**report.to_dict(), "out": str(path)}))
        return 0
    print(report.table())
    print(f"wrote {path} ({len(conversion.state_dict)} tensors) and {path}.json")
    if conversion.model_name:
        print(
            "build it: nonlocalnet.convert.create_model(weights="
            f"{str(path)!r}, source='nonlocalnet')  # = create_model({conversion.model_name!r}, "
            "**overrides) with every key loaded"
        )
    else:
        print(f"build it: {report.build} with the overrides in {path}.json, then load_state_dict")
    return 0
