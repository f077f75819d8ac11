"""The ``megatron-grow`` command (also ``python -m megatron_grow``).

Each subcommand lives in ``megatron_grow/cli/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches.

    megatron-grow plan --config configs/models/70b.yaml
    megatron-grow launch --nproc-per-node 2 grow --load SRC --save DST --recipe R.yaml
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
    from megatron_grow.parallel.launch import record_exit_code

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["launch"]):  # before the slow imports: a notice must not kill start-up
        from megatron_grow.parallel.preemption import defer_stop_signals

        defer_stop_signals()
    parser = build_parser()
    if argv[:1] == ["launch"]:  # torchrun's own options follow: not for argparse
        from megatron_grow.cli import launch

        return launch.main(argv[1:], set(parser._subparsers._group_actions[0].choices))
    args = parser.parse_args(argv)
    code = run_with_clean_errors(args._run, args)
    record_exit_code(code)  # for `megatron-grow launch` (torchrun itself keeps only "failed")
    return code


if __name__ == "__main__":
    sys.exit(main())
