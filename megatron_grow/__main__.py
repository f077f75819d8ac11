"""The ``megatron-grow`` command (also ``python -m megatron_grow``).

Each subcommand lives in ``megatron_grow/cli/<name>.py`` and exposes ``add_arguments(parser)``
and ``run(args) -> int``; this file only dispatches, by what a module declares, never by its name
(adding a command is adding its file):

* ``INSTALLS_CPU_MODE = True``: the command installs CPU mode itself, after its cheap checks
  (``grow``), or never needs it (``launch``); otherwise it is installed here before ``run``;
* ``DEFERS_STOP_SIGNALS = True``: SIGTERM/SIGUSR1 are remembered from start-up on, so a notice
  during the slow imports is not lost (``train``, ``launch``), and restored after ``run``;
* ``RAW_ARGV = True``: ``main(argv, commands)`` gets the words after the command unparsed
  (``launch``: torchrun's own options) instead of ``run(args)``.

Only the chosen subcommand's module is imported (the command list and its one-line help are
read from the modules' docstrings without importing them), and each module imports its heavy
work inside ``run()``, so ``--help`` and argument errors answer before torch and Megatron-Core
load.

    megatron-grow plan --config configs/models/70b.yaml
    megatron-grow launch --nproc-per-node 2 grow --load SRC --save DST --recipe R.yaml
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import warnings
from types import ModuleType

from megatron_grow.cli._errors import run_with_clean_errors
from megatron_grow.errors import EXIT_BAD_INPUT
from megatron_grow.parallel.lifetime import forked_children_die_with_parent
from megatron_grow.parallel.preemption import defer_stop_signals, restore_stop_signals
from megatron_grow.parallel.rank_status import record_exit_code

DESCRIPTION = ("Grow converged Mixture-of-Experts checkpoints (depth and width) inside Megatron-Core "
               "distributed checkpoints, and keep training them.")
CLI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli")


def available_commands() -> dict[str, tuple[str, str]]:
    """``{command: (module name, one-line help)}`` for every ``cli/<name>.py`` not starting with ``_``."""
    out = {}
    for filename in sorted(os.listdir(CLI_DIR)):
        if not filename.endswith(".py") or filename.startswith("_"):
            continue
        name = filename[:-3]
        with open(os.path.join(CLI_DIR, filename), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        out[name.replace("_", "-")] = (name, doc.strip().split("\n")[0])
    return out


def _top_parser(commands: dict) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {cmd:<16} {text}" for cmd, (_, text) in commands.items())
    parser = argparse.ArgumentParser(prog="megatron-grow", description=DESCRIPTION,
                                     epilog="commands:\n" + listing,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="megatron-grow [-h] COMMAND ...")
    parser.add_argument("command", metavar="COMMAND", choices=list(commands), help=argparse.SUPPRESS)
    return parser


def command_module(command: str) -> ModuleType:
    """The module of one subcommand (imports that module only; its parser-time imports are torch-free)."""
    module_name, _ = available_commands()[command]
    return importlib.import_module(f"megatron_grow.cli.{module_name}")


def _declares(module: ModuleType, flag: str) -> bool:
    return bool(getattr(module, flag, False))


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (imports that subcommand's module only)."""
    module = command_module(command)
    parser = argparse.ArgumentParser(prog=f"megatron-grow {command}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = available_commands()
    if not argv or argv[0] not in commands:
        _top_parser(commands).parse_args(argv[:1])  # prints help, or names the unknown command; exits
        return EXIT_BAD_INPUT
    # Megatron-Core warns at import time that Apex/TE are absent; the local spec is the design here.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")
    module = command_module(argv[0])
    if _declares(module, "FORKED_CHILDREN_DIE_WITH_IT"):  # a save's forked writer helpers must not outlive it
        forked_children_die_with_parent()
    if _declares(module, "DEFERS_STOP_SIGNALS"):  # before the slow imports: a notice must not kill start-up
        defer_stop_signals()
    if _declares(module, "RAW_ARGV"):
        return module.main(argv[1:], set(commands))
    args = build_parser(argv[0]).parse_args(argv[1:])
    if not _declares(module, "INSTALLS_CPU_MODE"):
        # Lazy (cost): platform.cpu imports torch, and --help must answer before torch loads.
        from megatron_grow.platform import cpu

        cpu.apply_cpu_adaptations()
    try:
        code = run_with_clean_errors(args._run, args)
    finally:
        if _declares(module, "DEFERS_STOP_SIGNALS"):
            restore_stop_signals()
    record_exit_code(code)  # for `megatron-grow launch` (torchrun itself keeps only "failed")
    return code


if __name__ == "__main__":
    sys.exit(main())
