"""Run a megatron-grow command under torchrun, keeping exit codes 2/3 and forwarding SIGTERM/SIGUSR1.

    megatron-grow launch [torchrun options] COMMAND [command arguments]
    megatron-grow launch --standalone --nproc-per-node 2 train --config RECIPE.yaml

Use this instead of ``torchrun -m megatron_grow ...``: torchrun alone turns every worker exit
code into 1 and does not pass SIGUSR1 on. Everything before COMMAND (the first argument that
names a megatron-grow command) is given to torchrun unchanged. The exit code is 3 if a worker
was stopped by SIGTERM/SIGUSR1 after saving, 2 if a worker reported bad input, else torchrun's
(see megatron_grow/parallel/launch.py).
"""

from __future__ import annotations

import argparse
import sys

from megatron_grow.errors import EXIT_BAD_INPUT

COMMAND = "launch"
RAW_ARGV = True  # torchrun's own options follow: main() gets them unparsed
DEFERS_STOP_SIGNALS = True  # forwarded to the workers once they run; before that, remembered
INSTALLS_CPU_MODE = True  # never needed: the launcher builds no model (each worker installs it)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Only for --help listings: `megatron-grow launch ...` is dispatched by main() before argparse.
    parser.add_argument("torchrun_options_then_command", nargs="*", metavar="...")


def split_argv(argv: list[str], commands: set[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, megatron-grow command line): split at the first command name."""
    for i, arg in enumerate(argv):
        if arg in commands and not (i > 0 and argv[i - 1].startswith("-") and "=" not in argv[i - 1]
                                    and argv[i - 1] in _TORCHRUN_FLAGS_WITH_VALUE):
            return argv[:i], argv[i:]
    return argv, []


# torchrun options that take a value (a command name given as their value is not the command).
_TORCHRUN_FLAGS_WITH_VALUE = {
    "--rdzv-id", "--rdzv_id", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
    "--role", "--log-dir", "--log_dir", "--master-addr", "--master_addr", "--run-path", "--local-addr",
    "--local_addr", "--logs-specs", "--logs_specs",
}


_NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")
_NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")  # torchrun's named counts


def nproc_problem(torchrun_options: list[str]) -> str | None:
    """What is wrong with a ``--nproc-per-node`` value (torchrun itself fails a bare assert on 0)."""
    for i, option in enumerate(torchrun_options):
        flag, has_value, value = option.partition("=")
        if flag not in _NPROC_FLAGS:
            continue
        if not has_value:
            value = torchrun_options[i + 1] if i + 1 < len(torchrun_options) else ""
        if value in _NPROC_WORDS:
            continue
        try:
            count = int(value)
        except ValueError:
            return f"--nproc-per-node must be a number >= 1 or one of {', '.join(_NPROC_WORDS)}, got {value!r}"
        if count < 1:
            return f"--nproc-per-node must be >= 1 (worker processes per node), got {count}"
    return None


def main(argv: list[str], commands: set[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    from megatron_grow.parallel.launch import launch  # torch: not for --help

    torchrun_options, command = split_argv(argv, commands - {COMMAND})
    if not command:
        print(f"megatron-grow: error: launch needs a megatron-grow command after the torchrun options "
              f"(one of: {', '.join(sorted(commands - {COMMAND}))})", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = nproc_problem(torchrun_options)
    if problem:
        print(f"megatron-grow: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return launch([*torchrun_options, "--module", "megatron_grow", *command])


def run(args: argparse.Namespace) -> int:  # reached only via argparse, i.e. never with real arguments
    print(__doc__.strip())
    return 0
