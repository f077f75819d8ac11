"""Layer-wise weight-norm profile (the paper's Fig. 2) of one or more checkpoints, with a plot.

    megatron-grow weight-norms runs/base
    megatron-grow weight-norms runs/interposed --compare runs/stacked --plot norms.png
    megatron-grow weight-norms runs/base/iter_0001000 --json

Per layer: ||W||_F / sqrt(numel) of every routed expert's gate, up and down projection,
averaged over the three and over experts; attention (linear_qkv, linear_proj) as a second
series. A stack growth shows a drop (cliff) where its copies join; interposition stays smooth.
Tensors are read one layer's experts at a time (no model, no torch.distributed). The plot
(matplotlib, Agg) has one line per checkpoint, labelled with the checkpoint's directory name.
"""

from __future__ import annotations

import argparse
import json

from megatron_grow.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="run root or iter_N directory")
    parser.add_argument("--compare", nargs="+", default=[], metavar="CKPT2", help="more checkpoints to profile")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="write a PNG plot")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--max-mib", type=float, default=256.0, help="largest single read in MiB (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    import os

    from megatron_grow.analysis.weight_norms import format_profiles, norm_profile, plot_profiles
    from megatron_grow.checkpoint.reader import stderr_progress

    if args.max_mib <= 0:
        raise UserInputError(f"--max-mib must be > 0, got {args.max_mib}")
    if args.plot:
        out_dir = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(out_dir):
            raise UserInputError(f"--plot {args.plot}: directory {out_dir} does not exist")
    progress = None if args.quiet else stderr_progress("weight-norms", 2.0)
    profiles = [norm_profile(p, max_bytes=int(args.max_mib * 2**20), progress=progress)
                for p in [args.checkpoint, *args.compare]]
    names = [p.name for p in profiles]
    for i, p in enumerate(profiles):  # distinct legend labels
        if names.count(p.name) > 1:
            p.name = f"{p.name}#{i + 1}"
    if args.plot:
        plot_profiles(profiles, args.plot, args.title)
    if args.json:
        print(json.dumps({"profiles": [p.as_dict() for p in profiles], "plot": args.plot}, sort_keys=True))
    else:
        print(format_profiles(profiles))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
