"""The ``megatron-grow`` command (also ``python -m megatron_grow``).

Each subcommand lives in ``megatron_grow/cli/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches.

    megatron-grow plan --config configs/models/70b.yaml
    torchrun --nproc-per-node 2 -m megatron_grow grow --load SRC --save DST --recipe R.yaml
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import megatron_grow.cli as cli_package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-grow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli_package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"megatron_grow.cli.{info.name}")
        name = getattr(module, "COMMAND", info.name.replace("_", "-"))
        help_text = (module.__doc__ or "").strip().split("\n")[0]
        sp = sub.add_parser(name, help=help_text, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Megatron-Core warns at import time that Apex/TE are absent; the local spec is the design here.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")
    from megatron_grow.cli._errors import run_with_clean_errors

    args = build_parser().parse_args(argv)
    return run_with_clean_errors(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
