"""The ``megatron-grow`` command (also ``python -m megatron_grow``).

Each subcommand lives in ``megatron_grow/cli/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches.

    megatron-grow plan --config configs/models/70b.yaml
    torchrun --nproc-per-node 2 -m megatron_grow grow --load SRC --save DST --recipe R.yaml
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import pkgutil
import sys

import megatron_grow.cli as cli_package


def _commands() -> dict[str, str]:
    """Command name -> module name under ``cli/``, found without importing the modules."""
    infos = sorted(pkgutil.iter_modules(cli_package.__path__), key=lambda i: i.name)
    return {i.name.replace("_", "-"): i.name for i in infos if not i.name.startswith("_")}


def _summary(module_name: str) -> str:
    """First docstring line of ``cli/<module_name>.py``, read from the file (nothing imported)."""
    path = os.path.join(os.path.dirname(cli_package.__file__), module_name + ".py")
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().split("\n")[0]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed. Only the command named in ``argv`` (all of them when
    ``argv`` is None) is imported: its module imports the heavy libraries at its top, and
    ``megatron-grow plan`` should not wait for Megatron-Core's training stack."""
    parser = argparse.ArgumentParser(prog="megatron-grow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in _commands().items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=_summary(module_name))
            continue
        module = importlib.import_module(f"megatron_grow.cli.{module_name}")
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

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return run_with_clean_errors(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
