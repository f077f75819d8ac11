"""Hostile inputs to every command: one line naming the problem, exit code 2, before any work.

The project's list of bad command lines and files that are cheap to reach (grow's cases against a
real source checkpoint are in tests/distributed/test_grow_bad_input.py; the NaN checkpoints for
inspect/export-hf/train are in tests/distributed/test_nonfinite_checkpoints.py). Each case runs
the real CLI entry point, ``megatron_grow.__main__.main``, in this process and checks:

* exit status 2, no traceback, nothing on stdout;
* stderr is one ``megatron-grow: error: ...`` line (a recipe error: that line naming the file,
  then one ``  - `` line with the problem), containing the expected fragments.

    .venv/bin/pytest -q tests/unit/test_hostile_inputs.py
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from megatron_grow.__main__ import main
from megatron_grow.parallel.preemption import restore_stop_signals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "models", "tiny.yaml")
GROWTH = os.path.join(ROOT, "configs", "growth", "tiny_depth_width.yaml")
PREFIX = "megatron-grow: error: "


@dataclass
class Case:
    argv: list
    expect: list = field(default_factory=list)
    recipe_error: bool = False


def _latin1_recipe(tmp: str) -> str:
    """A recipe saved by an editor in Latin-1: real bytes that are not UTF-8 (0xe9 is 'é')."""
    path = os.path.join(tmp, "latin1.yaml")
    text = f"include: {GROWTH}\n# r\u00e9glage de la croissance\ngrowth:\n  width:\n    alpha: 0.01\n"
    with open(path, "wb") as f:
        f.write(text.encode("latin-1"))
    return path


def _not_utf8(command: Callable[[str, str], list]) -> Callable[[str], Case]:
    def build(tmp: str) -> Case:
        recipe = _latin1_recipe(tmp)
        offset = len(f"include: {GROWTH}\n# r".encode())
        return Case(command(recipe, tmp), [recipe, "not UTF-8", "byte 0xe9", f"offset {offset}"], recipe_error=True)
    return build


def _grow(*extra: str) -> Callable[[str], Case]:
    def argv(tmp: str) -> list:
        return ["grow", "--load", os.path.join(tmp, "src"), "--save", os.path.join(tmp, "dst"), "--recipe", GROWTH,
                *extra]
    return argv


def _verify(*extra: str) -> Callable[[str], list]:
    return lambda tmp: ["verify", "--load", os.path.join(tmp, "src"), "--grown", os.path.join(tmp, "dst"), *extra]


def _eval(*extra: str) -> Callable[[str], list]:
    return lambda tmp: ["eval", "--load", os.path.join(tmp, "src"), *extra]


def _preprocess_dir(tmp: str) -> Case:
    folder = os.path.join(tmp, "corpus")
    os.makedirs(folder)
    with open(os.path.join(folder, "part1.txt"), "w", encoding="utf-8") as f:
        f.write("In the beginning.\n")
    argv = ["preprocess", "--input", folder, "--tokenizer-model", os.path.join(tmp, "tok.model"),
            "--output-prefix", os.path.join(tmp, "out")]
    return Case(argv, [folder, "is a directory", ".txt"])


def _plain(argv_of: Callable[[str], list], *expect: str) -> Callable[[str], Case]:
    return lambda tmp: Case(argv_of(tmp), list(expect))


CASES: dict[str, Callable[[str], Case]] = {
    # 3. a recipe that is not UTF-8 (was a UnicodeDecodeError traceback)
    "grow_recipe_not_utf8": _not_utf8(lambda r, tmp: ["grow", "--load", tmp, "--save", tmp + "/dst", "--recipe", r]),
    "train_recipe_not_utf8": _not_utf8(lambda r, tmp: ["train", "--config", r]),
    "plan_recipe_not_utf8": _not_utf8(lambda r, tmp: ["plan", "--config", r]),
    "train_include_not_utf8": _not_utf8(lambda r, tmp: ["train", "--config", _including(tmp, r)]),
    # 4. eval and launch arguments (were a traceback and a bare AssertionError)
    "eval_limit_negative": _plain(_eval("--tasks", "kjv_cloze", "--limit", "-1"), "--limit", ">= 1", "-1"),
    "eval_tasks_empty": _plain(_eval("--tasks", ""), "--tasks", "no task"),
    "eval_tasks_only_commas": _plain(_eval("--tasks", " , ,"), "--tasks", "no task"),
    "launch_nproc_zero": _plain(lambda tmp: ["launch", "--nproc-per-node", "0", "plan", "--config", TINY],
                                "--nproc-per-node", ">= 1", "got 0"),
    "launch_nproc_zero_underscore": _plain(lambda tmp: ["launch", "--nproc_per_node=0", "plan", "--config", TINY],
                                           "--nproc-per-node", "got 0"),
    # 5. verify thresholds no result can meet (were accepted, then "failed" verify with exit 4)
    "grow_max_kl_nan": _plain(_grow("--max-kl", "nan"), "--max-kl", "finite", "nan"),
    "grow_max_kl_negative": _plain(_grow("--max-kl", "-1"), "--max-kl", ">= 0", "-1.0"),
    "grow_min_routing_share_2": _plain(_grow("--min-routing-share", "2"), "--min-routing-share", "between 0 and 1"),
    "grow_min_routing_share_nan": _plain(_grow("--min-routing-share", "nan"), "--min-routing-share", "nan"),
    "verify_max_kl_nan": _plain(_verify("--max-kl", "nan"), "--max-kl", "finite"),
    "verify_max_kl_negative": _plain(_verify("--max-kl", "-1"), "--max-kl", ">= 0"),
    "verify_min_routing_share_2": _plain(_verify("--min-routing-share", "2"), "--min-routing-share", "2.0"),
    # 7. a directory where files are expected (was "not found")
    "preprocess_input_dir": _preprocess_dir,
}


def _including(tmp: str, included: str) -> str:
    """A UTF-8 recipe whose include: is the Latin-1 one: the error names the included file."""
    path = os.path.join(tmp, "outer.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"include: {included}\n")
    return path


def run_main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        finally:
            restore_stop_signals()  # main() defers SIGTERM/SIGUSR1 for train and launch: not in pytest
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str, expect: list, recipe_error: bool = False) -> None:
    where = f"\nstdout:\n{out}\nstderr:\n{err}"
    assert code == 2, f"exit status {code}, expected 2{where}"
    assert "Traceback" not in err, where
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith(PREFIX), where
    if recipe_error:  # "invalid recipe FILE:" then exactly one "  - problem" line
        assert len(lines) == 2 and lines[1].startswith("  - "), where
    else:
        assert len(lines) == 1, f"the error must be one line{where}"
    for fragment in expect:
        assert fragment in err, f"error does not mention {fragment!r}{where}"
    assert out.strip() == "", f"the command did work before refusing{where}"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_exit_2(name, tmp_path):
    case = CASES[name](str(tmp_path))
    code, out, err = run_main(case.argv)
    assert_one_line_error(code, out, err, case.expect, case.recipe_error)
    assert not os.path.exists(os.path.join(tmp_path, "dst")), "grow wrote its destination"
