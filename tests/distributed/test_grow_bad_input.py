"""``megatron-grow grow`` on bad input: one clear error, exit 2, nothing written, source untouched.

Every case runs the real CLI entry point (in this process; one test checks that a real
subprocess agrees) against its own copy
of one tiny source checkpoint and checks that

* the exit status is 2 and stderr is exactly the error (``megatron-grow: error: ...``, no
  traceback; a recipe error lists its single problem on an indented ``  - `` line),
* the message names the problem (the recipe key, the file, the tensor and both shapes ...),
* nothing was written to --save (it does not exist afterwards, or is unchanged when it was
  there before), and the source tree is byte-for-byte unchanged (file list + content hashes).

Then a grow into a non-empty --save with --overwrite succeeds, and a grow SIGKILLed at random
moments never leaves a destination that looks valid but is not: after each kill either the
tracker is absent (``read_tracker`` raises) or the iteration it names passes
``check_shard_files``; a later ``--overwrite`` grow into the same destination succeeds.

    .venv/bin/pytest -q tests/distributed/test_grow_bad_input.py

The error cases run two at a time (each process spends most of its ~5-10 s importing torch
and Megatron-Core); the kill runs run alone so their timing means something.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from megatron_grow.checkpoint import io, paths
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.errors import CheckpointError
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward, build_save_with_nan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = "configs/growth/tiny_depth_width.yaml"     # 4 -> 8 layers, 8 -> 16 experts, top-2 -> top-4
MODEL_RECIPE = os.path.join(REPO, "configs/models/tiny.yaml")
PREFIX = "megatron-grow: error: "
CLI_TIMEOUT = 300
# torch's advice for other situations (untrusted pickles, its own bugs): never ours to repeat
TORCH_ADVICE = ("weights_only", "file an issue", "miniz error", "If you are seeing this error")


# ------------------------------------------------------------------------------------------------
# Helpers


def cli_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONWARNINGS"] = "ignore"  # Megatron's import-time warnings; our error is what is checked
    env["OMP_NUM_THREADS"] = str(threads)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def grow_argv(load: str, save: str, *extra: str, overrides: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "megatron_grow", "grow", "--load", load, "--save", save,
            "--recipe", RECIPE, "--no-verify", "--quiet", *extra, *overrides]


def run_cli(argv: list[str], threads: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=cli_env(threads), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)


def run_cli_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``megatron_grow.__main__.main`` in this process: the same code as the CLI without paying the
    torch/megatron import per case. Every case here fails before torch.distributed starts;
    ``test_in_process_matches_subprocess`` checks both ways agree."""
    import contextlib
    import io as _io

    from megatron_grow.__main__ import main

    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv[3:])
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def tree_digest(root: str) -> dict | None:
    """{relative path: sha256} for every file under ``root`` (directories as ``path/``); None if absent."""
    if not os.path.exists(root):
        return None
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel_dir, d)) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.normpath(os.path.join(rel_dir, name))] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_complete_checkpoint(root: str) -> tuple[str, int]:
    """The tracker names an iteration whose every shard byte range exists; returns (dir, iteration)."""
    iteration = paths.read_tracker(root)
    ckpt = paths.iteration_dir(root, iteration)
    io.check_shard_files(ckpt)
    assert os.path.isfile(os.path.join(ckpt, paths.MANIFEST_FILENAME)), f"{ckpt} has no manifest"
    assert os.path.isfile(os.path.join(ckpt, "common.pt")), f"{ckpt} has no common.pt"
    return ckpt, iteration


def assert_grown(root: str) -> None:
    ckpt, iteration = assert_complete_checkpoint(root)
    model = read_checkpoint_info(ckpt, iteration).model
    assert (model.num_layers, model.num_moe_experts, model.moe_router_topk) == (8, 16, 4), model


def shards(ckpt_dir: str) -> list[str]:
    names = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".distcp"))
    assert names, f"no .distcp shards in {ckpt_dir}"
    return names


# ------------------------------------------------------------------------------------------------
# The source checkpoint (one per module)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("grow_bad_input_src") / "ckpt")
    model = load_recipe(MODEL_RECIPE).model
    run_in_processes(build_save_forward, 1, (model, ParallelConfig(), root))
    assert_complete_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def nan_sources(tmp_path_factory) -> dict:
    """{parameter name fragment: a checkpoint whose first such parameter holds one NaN}, by the real save."""
    base = tmp_path_factory.mktemp("grow_bad_input_nan")
    saves = {fragment: str(base / fragment) for fragment in ("linear_fc1", "linear_qkv")}
    model = load_recipe(MODEL_RECIPE).model
    run_in_processes(build_save_with_nan, 1, (model, ParallelConfig(), [(root, f) for f, root in saves.items()]))
    return saves


# ------------------------------------------------------------------------------------------------
# The bad-input cases


@dataclass
class Ctx:
    """Paths of one case: its private source copy, the --save path, a scratch directory."""

    src: str
    dst: str
    tmp: str
    load: str = ""
    save: str = ""
    args: list = field(default_factory=list)
    overrides: tuple = ()
    expect: list = field(default_factory=list)
    recipe_error: bool = False   # a ConfigError: header line + one indented problem line
    held: Any = None             # a lock the case holds while the command runs (released after)
    after_start: bool = False    # found while reading SRC: the start line may be on stdout
    nan_sources: dict = field(default_factory=dict)  # {parameter name fragment: checkpoint with a NaN there}


def _model_yaml(ctx: Ctx, name: str, **model) -> str:
    path = os.path.join(ctx.tmp, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"include: {MODEL_RECIPE}\n")
        if model:
            f.write("model:\n" + "".join(f"  {k}: {v}\n" for k, v in model.items()))
    return path


def _ckpt(ctx: Ctx) -> str:
    return paths.iteration_dir(ctx.src, 1)


def case_depth_factor_1(ctx):
    ctx.overrides, ctx.recipe_error = ("growth.depth.factor=1",), True
    ctx.expect = ["growth.depth.factor", ">= 2"]


def case_width_factor_1(ctx):
    ctx.overrides, ctx.recipe_error = ("growth.width.factor=1",), True
    ctx.expect = ["growth.width.factor", ">= 2"]


def case_negative_alpha(ctx):
    ctx.overrides, ctx.recipe_error = ("growth.width.alpha=-0.1",), True
    ctx.expect = ["growth.width.alpha", "-0.1", ">= 0"]


def case_unknown_noise(ctx):
    ctx.overrides, ctx.recipe_error = ("growth.width.noise=uniformish",), True
    ctx.expect = ["growth.width.noise", "uniformish", "gaussian"]


def case_ignore_covers_all_layers(ctx):
    ctx.overrides, ctx.recipe_error = ("growth.depth.ignore_first=2", "growth.depth.ignore_last=2"), True
    ctx.expect = ["growth.depth.ignore_first", "growth.depth.ignore_last", "num_layers (4)"]


def case_experts_not_divisible_by_ep(ctx):
    # 8 experts x 2 = 16 grown experts on EP=3; must be named before torch.distributed starts (world 1).
    ctx.args = ["--expert-model-parallel-size", "3"]
    ctx.expect = ["expert_model_parallel_size (3)", "num_moe_experts (16)"]


def case_heads_not_divisible_by_tp(ctx):
    ctx.args = ["--tensor-model-parallel-size", "3"]
    ctx.expect = ["tensor_model_parallel_size (3)", "num_attention_heads (4)"]


def case_source_missing(ctx):
    ctx.load = os.path.join(ctx.tmp, "no_such_checkpoint")
    ctx.expect = ["does not exist", ctx.load]


def case_no_tracker(ctx):
    os.remove(os.path.join(ctx.src, paths.TRACKER_FILENAME))
    ctx.expect = [paths.TRACKER_FILENAME, ctx.src]


def case_tracker_names_missing_iteration(ctx):
    paths.write_tracker(ctx.src, 7)
    ctx.expect = ["iteration 7", "iter_0000007"]


def case_truncated_shard(ctx):
    path = os.path.join(_ckpt(ctx), shards(_ckpt(ctx))[0])
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    ctx.expect = ["truncated", os.path.basename(path), str(size // 2)]


def case_missing_shard(ctx):
    name = shards(_ckpt(ctx))[-1]
    os.remove(os.path.join(_ckpt(ctx), name))
    ctx.expect = ["missing", name]


def case_garbage_metadata_json(ctx):
    with open(os.path.join(_ckpt(ctx), "metadata.json"), "w", encoding="utf-8") as f:
        f.write("{this is not json\x00")
    ctx.expect = ["metadata.json", "unreadable"]


def case_source_config_hidden_size(ctx):
    ctx.args = ["--source-config", _model_yaml(ctx, "hidden128.yaml", hidden_size=128)]
    ctx.expect = ["embedding.word_embeddings.weight", "(256, 64)", "(256, 128)"]


def case_source_config_expert_count(ctx):
    ctx.args = ["--source-config", _model_yaml(ctx, "experts4.yaml", num_moe_experts=4)]
    ctx.expect = ["decoder.layers.mlp.router.weight", "(4, 8, 64)", "(4, 4, 64)"]


def case_dst_not_empty(ctx):
    os.makedirs(os.path.join(ctx.dst, "iter_0000003"))
    with open(os.path.join(ctx.dst, "notes.txt"), "w", encoding="utf-8") as f:
        f.write("somebody's files\n")
    ctx.expect = ["--overwrite", "not empty", ctx.dst]


def case_recipe_without_growth(ctx):
    recipe = _model_yaml(ctx, "no_growth.yaml")
    ctx.args = ["--recipe", recipe]  # argparse: the last --recipe wins
    ctx.expect = ["no growth: section", recipe]


def case_save_inside_load(ctx):
    ctx.save = os.path.join(ctx.src, "grown")
    ctx.expect = ["inside the source checkpoint", ctx.save]


def case_save_contains_source(ctx):
    # grow --load P/src --save P --overwrite: used to delete the source
    ctx.save, ctx.args = ctx.tmp, ["--overwrite"]
    ctx.expect = ["contains the source checkpoint", ctx.src]


def case_save_is_link_to_source(ctx):
    # used to delete the source's tracker, then fail with "Cannot call rmtree on a symbolic link"
    ctx.save, ctx.args = os.path.join(ctx.tmp, "link"), ["--overwrite"]
    os.symlink(ctx.src, ctx.save)
    ctx.expect = ["--save " + ctx.save, "resolves to", "the source checkpoint"]


def case_save_is_source_spelled_differently(ctx):
    ctx.save, ctx.args = os.path.join(ctx.src, "iter_0000001", ".."), ["--overwrite"]
    ctx.expect = ["the source checkpoint", ctx.src]


def case_save_being_written_by_another_grow(ctx):
    # two grows to one --save used to delete each other's staging directory
    ctx.held = paths.DestinationLock(ctx.dst, "grow").acquire()  # this test process is the other grow
    ctx.expect = ["being written by another grow", f"pid {os.getpid()}", ctx.dst]


def case_load_iteration_dir_save_its_run(ctx):
    ctx.load, ctx.save, ctx.args = _ckpt(ctx), ctx.src, ["--overwrite"]
    ctx.expect = ["contains the source checkpoint", "iter_0000001"]


def case_binary_tracker(ctx):
    with open(os.path.join(ctx.src, paths.TRACKER_FILENAME), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    ctx.expect = [paths.TRACKER_FILENAME, "not a text file"]


def case_garbage_common_pt(ctx):
    with open(os.path.join(_ckpt(ctx), "common.pt"), "wb") as f:
        f.write(b"PK\x03\x04 this is not a torch file" * 8)
    ctx.expect = ["common.pt", "unreadable"]


def case_garbage_common_pt_not_a_pickle(ctx):
    # torch's weights-only unpickler fails on it; it used to append "Re-running torch.load with
    # weights_only set to False will likely succeed" (wrong advice for a damaged file)
    with open(os.path.join(_ckpt(ctx), "common.pt"), "wb") as f:
        f.write(bytes(range(256)) * 4)
    ctx.expect = ["common.pt", "unreadable", "not a tensor file"]


def _flip_item_header(ctx: Ctx, fqn_prefix: str) -> str:
    """XOR the first bytes of the first stored item of ``fqn_prefix`` (its torch.save zip header) in
    its real shard; returns the shard's name. Sizes are unchanged, so only reading it shows it."""
    md = io.read_storage_metadata(_ckpt(ctx))
    info = next(info for index, info in sorted(md.storage_data.items(), key=lambda kv: kv[1].offset)
                if index.fqn.startswith(fqn_prefix))
    path = os.path.join(_ckpt(ctx), info.relative_path)
    with open(path, "r+b") as f:
        f.seek(info.offset)
        header = f.read(40)
        f.seek(info.offset)
        f.write(bytes(b ^ 0xFF for b in header))
    return info.relative_path


def case_flipped_shard_expert(ctx):
    # Read in the main thread (the noise statistics); was torch's miniz advice without the file's name.
    name = _flip_item_header(ctx, "decoder.layers.mlp.experts.experts.linear_fc1.weight")
    ctx.after_start = True
    ctx.expect = [f"checkpoint shard {_ckpt(ctx)}/{name} is damaged", "linear_fc1.weight"]


def case_flipped_shard_streamed(ctx):
    # Read by a writer thread while the grown checkpoint is written: was a traceback per writer thread.
    name = _flip_item_header(ctx, "decoder.layers.self_attention.linear_qkv.weight")
    ctx.after_start = True
    ctx.expect = [f"checkpoint shard {_ckpt(ctx)}/{name} is damaged", "linear_qkv.weight"]


def _use_nan_source(ctx: Ctx, fragment: str) -> None:
    shutil.rmtree(ctx.src)
    shutil.copytree(ctx.nan_sources[fragment], ctx.src)
    ctx.after_start = True


def case_nan_in_source_expert(ctx):
    # was "ValueError: std must be finite and >= 0, got nan" (a traceback)
    _use_nan_source(ctx, "linear_fc1")
    ctx.expect = ["decoder.layers.mlp.experts.experts.linear_fc1.weight", "layer 0, expert 0", "non-finite"]


def case_nan_in_source_attention(ctx):
    # was copied into every grown copy without a word
    _use_nan_source(ctx, "linear_qkv")
    ctx.expect = ["decoder.layers.self_attention.linear_qkv.weight", "1 NaN", "non-finite"]


def case_depth_factor_huge(ctx):
    # was minutes of silence (index maps and modules for 400,000,000 layers), then whatever broke first
    ctx.overrides = ("growth.depth.factor=100000000",)
    ctx.expect = ["growth.depth.factor=100000000", "400,000,000 layers", "no space left on device",
                  "are free at " + ctx.dst]


def case_width_factor_huge(ctx):
    ctx.overrides = ("growth.width.factor=10000000",)
    ctx.expect = ["growth.width.factor=10000000", "80,000,000 experts", "no space left on device",
                  "are free at " + ctx.dst]


CASES: dict[str, Callable[[Ctx], None]] = {
    "depth_factor_1": case_depth_factor_1,
    "width_factor_1": case_width_factor_1,
    "negative_alpha": case_negative_alpha,
    "unknown_noise": case_unknown_noise,
    "ignore_covers_all_layers": case_ignore_covers_all_layers,
    "experts_not_divisible_by_ep": case_experts_not_divisible_by_ep,
    "heads_not_divisible_by_tp": case_heads_not_divisible_by_tp,
    "source_missing": case_source_missing,
    "no_tracker": case_no_tracker,
    "tracker_names_missing_iteration": case_tracker_names_missing_iteration,
    "truncated_shard": case_truncated_shard,
    "missing_shard": case_missing_shard,
    "garbage_metadata_json": case_garbage_metadata_json,
    "source_config_hidden_size": case_source_config_hidden_size,
    "source_config_expert_count": case_source_config_expert_count,
    "dst_not_empty": case_dst_not_empty,
    "recipe_without_growth": case_recipe_without_growth,
    "save_inside_load": case_save_inside_load,
    "save_contains_source": case_save_contains_source,
    "save_is_link_to_source": case_save_is_link_to_source,
    "save_is_source_spelled_differently": case_save_is_source_spelled_differently,
    "save_being_written_by_another_grow": case_save_being_written_by_another_grow,
    "load_iteration_dir_save_its_run": case_load_iteration_dir_save_its_run,
    "binary_tracker": case_binary_tracker,
    "garbage_common_pt": case_garbage_common_pt,
    "garbage_common_pt_not_a_pickle": case_garbage_common_pt_not_a_pickle,
    "flipped_shard_expert": case_flipped_shard_expert,
    "flipped_shard_streamed": case_flipped_shard_streamed,
    "nan_in_source_expert": case_nan_in_source_expert,
    "nan_in_source_attention": case_nan_in_source_attention,
    "depth_factor_huge": case_depth_factor_huge,
    "width_factor_huge": case_width_factor_huge,
}


@dataclass
class Outcome:
    ctx: Ctx
    proc: subprocess.CompletedProcess
    src_before: dict | None
    src_after: dict | None
    dst_before: dict | None
    dst_after: dict | None
    load_existed: bool


def _run_case(name: str, source: str, base: str, nan_sources: dict) -> Outcome:
    tmp = os.path.join(base, name)
    os.makedirs(tmp)
    src = os.path.join(tmp, "src")
    shutil.copytree(source, src)
    ctx = Ctx(src=src, dst=os.path.join(tmp, "dst"), tmp=tmp, nan_sources=nan_sources)
    CASES[name](ctx)
    ctx.load, ctx.save = ctx.load or ctx.src, ctx.save or ctx.dst
    src_before, dst_before = tree_digest(ctx.src), tree_digest(ctx.save)
    load_existed = os.path.exists(ctx.load)
    proc = run_cli_in_process(grow_argv(ctx.load, ctx.save, *ctx.args, overrides=ctx.overrides))
    if ctx.held is not None:
        ctx.held.release()
    return Outcome(ctx, proc, src_before, tree_digest(ctx.src), dst_before, tree_digest(ctx.save),
                   load_existed)


@pytest.fixture(scope="module")
def bad_input_outcomes(request, source, nan_sources, tmp_path_factory) -> dict:
    """Run every selected case (in this process, one after another); {name: Outcome}."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if hasattr(item, "callspec") and item.module.__name__ == __name__
                and "case" in item.callspec.params]
    names = [n for n in CASES if n in selected] or list(CASES)
    base = str(tmp_path_factory.mktemp("grow_bad_input_cases"))
    return {n: _run_case(n, source, base, nan_sources) for n in names}


def test_in_process_matches_subprocess(source, tmp_path):
    """The real CLI process gives the same exit code and message as the in-process runs."""
    src = str(tmp_path / "src")
    shutil.copytree(source, src)
    argv = grow_argv(src, str(tmp_path / "dst"), "--tensor-model-parallel-size", "3")
    real, here = run_cli(argv), run_cli_in_process(argv)
    assert real.returncode == here.returncode == 2, real.stderr
    assert real.stderr.strip().splitlines()[-1] == here.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly_before_writing(case, bad_input_outcomes):
    out = bad_input_outcomes[case]
    ctx, proc = out.ctx, out.proc
    where = f"\nargv tail: {proc.args[4:]}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, f"exit status {proc.returncode}, expected 2{where}"
    assert "Traceback" not in proc.stderr, where
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[0].startswith(PREFIX), where
    if ctx.recipe_error:  # "invalid recipe FILE:" then exactly one "  - key: problem" line
        assert len(lines) == 2 and lines[1].startswith("  - "), where
    else:
        assert len(lines) == 1, f"the error must be one line{where}"
    message = "\n".join(lines)
    for fragment in ctx.expect:
        assert fragment in message, f"error does not mention {fragment!r}{where}"
    for advice in TORCH_ADVICE:
        assert advice not in message, f"torch's own advice leaked into the error{where}"
    if not ctx.after_start:
        assert proc.stdout.strip() == "", f"the command got past validation{where}"
    # Nothing written: --save is as it was (absent, or untouched when it existed), SRC unchanged.
    assert out.dst_after == out.dst_before, f"--save {ctx.save} was written to{where}"
    if out.dst_before is None:
        assert out.dst_after is None, where
    assert out.src_after == out.src_before, f"source checkpoint {ctx.src} changed{where}"
    assert os.path.exists(ctx.load) == out.load_existed, f"--load {ctx.load} was created{where}"


# ------------------------------------------------------------------------------------------------
# --overwrite, and interrupted grows


@dataclass
class FullRun:
    proc: subprocess.CompletedProcess
    dst: str
    seconds: float
    src_before: dict
    src_after: dict


@pytest.fixture(scope="module")
def overwrite_run(source, tmp_path_factory) -> FullRun:
    """A complete grow with --overwrite into a non-empty --save; also times one full run."""
    dst = str(tmp_path_factory.mktemp("grow_overwrite") / "dst")
    os.makedirs(os.path.join(dst, "iter_0000003"))
    with open(os.path.join(dst, "notes.txt"), "w", encoding="utf-8") as f:
        f.write("stale\n")
    before = tree_digest(source)
    t0 = time.perf_counter()
    proc = run_cli(grow_argv(source, dst, "--overwrite"), threads=2)
    seconds = time.perf_counter() - t0
    return FullRun(proc, dst, seconds, before, tree_digest(source))


def test_overwrite_replaces_non_empty_destination(overwrite_run):
    run = overwrite_run
    assert run.proc.returncode == 0, f"stdout:\n{run.proc.stdout}\nstderr:\n{run.proc.stderr}"
    assert_grown(run.dst)
    left = sorted(os.listdir(run.dst))
    assert left == sorted([paths.TRACKER_FILENAME, "iter_0000001"]), f"stale files survived: {left}"
    assert run.src_after == run.src_before, "the source checkpoint changed"


def test_damaged_shard_under_launch_is_one_line_from_two_ranks(source, tmp_path):
    """Two ranks, one damaged item read by one rank's writer threads while the other rank writes.
    Was a traceback per writer thread, then a hang or the other rank's traceback; now both ranks
    leave the same way and rank 0 says it once. (An item read for the noise statistics goes through
    the same agreement, source_reads._raise_on_every_rank.)"""
    fqn = "decoder.layers.self_attention.linear_qkv.weight"
    ctx = Ctx(src=str(tmp_path / "src"), dst=str(tmp_path / "dst"), tmp=str(tmp_path))
    shutil.copytree(source, ctx.src)
    name = _flip_item_header(ctx, fqn)
    argv = [sys.executable, "-m", "megatron_grow", "launch", "--nproc-per-node", "2",
            *grow_argv(ctx.src, ctx.dst, "--expert-model-parallel-size", "2")[3:]]
    proc = run_cli(argv)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert len(errors) == 1 and f"checkpoint shard {_ckpt(ctx)}/{name} is damaged" in errors[0], proc.stderr
    assert not os.path.exists(ctx.dst)


def test_capacity_estimate_is_a_lower_bound_of_what_grow_writes(overwrite_run, source):
    """The refusal above compares count_params(grown) x stored bytes per element with the free disk:
    that must not exceed the tensor bytes a real grow writes (else a growth that fits is refused)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_grow.growth.capacity import capacity_problem
    from megatron_grow.models.params import count_params

    assert overwrite_run.proc.returncode == 0, overwrite_run.proc.stderr
    ckpt, _ = assert_complete_checkpoint(overwrite_run.dst)
    md = io.read_storage_metadata(ckpt)
    written = sum(math.prod(m.size) * m.properties.dtype.itemsize for k, m in md.state_dict_metadata.items()
                  if isinstance(m, TensorStorageMetadata))
    growth = load_recipe(os.path.join(REPO, RECIPE)).growth
    source_model = read_checkpoint_info(*paths.resolve_checkpoint_dir(source)).model
    grown_model = read_checkpoint_info(ckpt, 1).model
    estimate = count_params(grown_model).total * 4  # fp32 on CPU
    assert 0.9 * written <= estimate <= written, (estimate, written)
    # ... and the check says yes with exactly that much space, no with one byte less.
    assert capacity_problem(source_model, growth, 4, "D", estimate, None, False) is None
    assert "MiB are free at D" in capacity_problem(source_model, growth, 4, "D", estimate - 1, None, False)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started for ``proc`` (it and any writer children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


GROW_KILLS = 10        # with test_training's 10: 20 SIGKILLs per full run
GROW_KILL_SEED = 20261129


@pytest.mark.slow
def test_killed_grow_leaves_no_valid_looking_partial_destination(source, overwrite_run, tmp_path):
    """SIGKILL at seeded moments; the destination is either not a checkpoint or a complete one.

    Odd runs overwrite a complete grown checkpoint (so a kill can land while the old one is
    being removed); even runs grow into a fresh directory. Delays are stratified over
    [0.5 s, one full run] so that kills land in every phase (imports, load, save, rename).
    """
    assert overwrite_run.proc.returncode == 0, overwrite_run.proc.stderr
    seed = GROW_KILL_SEED
    rng = random.Random(seed)
    n = GROW_KILLS
    full = max(overwrite_run.seconds, 1.0)
    delays = [0.5 + (i + rng.random()) * (full - 0.5) / n for i in range(n)]
    source_digest = tree_digest(source)
    report = []
    for i, delay in enumerate(delays):
        dst = str(tmp_path / f"kill{i}")
        extra = []
        if i % 2:
            shutil.copytree(overwrite_run.dst, dst)
            extra = ["--overwrite"]
        with open(str(tmp_path / f"kill{i}.stderr"), "w") as err:
            proc = subprocess.Popen(grow_argv(source, dst, *extra), cwd=REPO, env=cli_env(2),
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, killed = proc.returncode, True
        tracker = os.path.join(dst, paths.TRACKER_FILENAME)
        context = f"run {i} (seed {seed}, delay {delay:.2f}s of a {full:.2f}s run, killed={killed}, rc={rc})"
        if not killed:
            assert rc == 0, f"{context}: {open(str(tmp_path / f'kill{i}.stderr')).read()}"
        if os.path.exists(tracker):
            try:
                assert_complete_checkpoint(dst)
            except CheckpointError as e:
                pytest.fail(f"{context}: {dst} has a tracker but is not a complete checkpoint: {e}")
            state = "complete"
        else:
            with pytest.raises(CheckpointError):
                paths.read_tracker(dst)
            state = "no tracker" + (f" ({len(os.listdir(dst))} entries)" if os.path.isdir(dst) else ", absent")
        report.append(f"{context}: {state}")
        assert tree_digest(source) == source_digest, f"{context}: the source checkpoint changed"
    print("\n".join(report))
    assert any("killed=True" in r for r in report), report

    # A later grow with --overwrite into a destination a kill left behind succeeds.
    leftovers = [i for i in range(n) if os.path.isdir(str(tmp_path / f"kill{i}"))
                 and not os.path.exists(str(tmp_path / f"kill{i}" / paths.TRACKER_FILENAME))]
    dst = str(tmp_path / f"kill{(leftovers or [0])[0]}")
    proc = run_cli(grow_argv(source, dst, "--overwrite"), threads=2)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert_grown(dst)
    assert not paths.incomplete_dirs(dst), os.listdir(dst)
    assert tree_digest(source) == source_digest, "the source checkpoint changed"


# ------------------------------------------------------------------------------------------------
# --overwrite replaces the destination only once the new checkpoint is complete


def test_overwrite_crash_at_every_step_leaves_old_or_new_checkpoint(source, overwrite_run, tmp_path):
    """Die (os._exit, no cleanup) at the 1st, 2nd, ... filesystem-changing call of the write and
    swap of a grow --overwrite, until a run gets to the end. After each crash --save holds a
    complete checkpoint: the old one (marked) or the new one. The old code removed the old
    destination first, so a crash before the new one was in left nothing."""
    assert overwrite_run.proc.returncode == 0, overwrite_run.proc.stderr
    source_digest = tree_digest(source)
    outcomes, crash_at = [], 0
    while True:
        crash_at += 1
        assert crash_at <= 20, f"more than 20 filesystem calls: {outcomes}"
        dst = str(tmp_path / f"crash{crash_at}")
        shutil.copytree(overwrite_run.dst, dst)
        with open(os.path.join(dst, "OLD"), "w", encoding="utf-8") as f:
            f.write("the checkpoint that was here before\n")
        argv = [sys.executable, "-m", "tests.distributed.crash_inject", str(crash_at)] + grow_argv(
            source, dst, "--overwrite")[3:]
        proc = run_and_reap(argv, str(tmp_path / f"crash{crash_at}.log"))
        finished = "CALLS " in proc.stderr
        if not finished:
            assert proc.returncode == 9, f"call {crash_at}: rc {proc.returncode}\n{proc.stderr}"
        assert_grown(dst)  # the tracker names a complete grown checkpoint whichever copy it is
        which = "old" if os.path.exists(os.path.join(dst, "OLD")) else "new"
        outcomes.append((crash_at, which))
        assert tree_digest(source) == source_digest, f"call {crash_at}: the source checkpoint changed"
        if finished:
            assert proc.returncode == 0 and which == "new", proc.stderr
            break
    print(outcomes)
    assert outcomes[0][1] == "old" and len(outcomes) >= 3, outcomes
    # Whatever a crash left beside --save is cleared by the next grow.
    proc = run_cli(grow_argv(source, str(tmp_path / "crash1"), "--overwrite"), threads=2)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "crash1")) == sorted([paths.TRACKER_FILENAME, "iter_0000001"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(("crash1.staging-", "crash1.retired-"))], \
        os.listdir(tmp_path)


def run_and_reap(argv: list[str], log: str) -> subprocess.CompletedProcess:
    """Run in a new session; when the main process is gone (maybe by os._exit), SIGKILL what is left
    of its session (MCore's shard-writer helpers), as a kill by a launcher or SLURM would."""
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(2), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=CLI_TIMEOUT)
        finally:
            _kill_group(proc)
    with open(log, encoding="utf-8") as f:
        text = f.read()
    return subprocess.CompletedProcess(argv, rc, "", text)


def test_read_only_save_is_refused_before_loading_the_source(source, tmp_path):
    """--save on a read-only mount: exit 2, one line, before the source is read (the source here
    is damaged too: the destination must be the error reported)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user + mount namespace) is not available")
    src = str(tmp_path / "src")
    shutil.copytree(source, src)
    ckpt = paths.iteration_dir(src, 1)
    shard = os.path.join(ckpt, shards(ckpt)[0])
    os.truncate(shard, os.path.getsize(shard) // 2)
    ro = tmp_path / "ro"
    ro.mkdir()
    dst = str(ro / "grown")
    argv = " ".join(grow_argv(src, dst))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro} && exec {argv}"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(PREFIX), proc.stderr
    assert "not writable" in lines[0] and dst in lines[0], lines[0]
    assert proc.stdout.strip() == ""


def test_full_disk_at_save_is_one_line_and_leaves_nothing(source, tmp_path):
    """--save on a 256 KiB tmpfs (the grown checkpoint needs megabytes): exit 2, one line naming the
    full disk, nothing left on that disk (no DST, no staging directory), the source unchanged."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user + mount namespace) is not available")
    small = tmp_path / "small"
    small.mkdir()
    dst = str(small / "grown")
    before = tree_digest(source)
    argv = " ".join(grow_argv(source, dst))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c",
                           f"mount -t tmpfs -o size=256k tmpfs {small} && {argv}; rc=$?; ls -A {small}; exit $rc"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "no space left on device" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    listed = [line for line in proc.stdout.splitlines() if not line.startswith("[grow]")]
    assert listed == [], f"left on the full disk: {listed}"
    assert tree_digest(source) == before
