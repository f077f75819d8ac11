"""Checkpoints holding NaN, or damaged bytes: every command names the tensor or the file (issue 21).

The NaN is put into one real parameter of a real model, which the real save then writes (as a
diverged run would leave it; ``bodies.build_save_with_nan``), or into one tensor of a real
``transformers`` model written by ``save_pretrained``. Before:

* ``inspect --stats`` printed ``nan nan 0.0`` (absmax hid the NaN) and exited 0;
* ``export-hf`` wrote the NaN weights and exited 0;
* ``train`` (``checkpoint.load_optim: false``) trained from the checkpoint, stopped at the first
  step with a NaN loss and called that checkpoint "the last good checkpoint";
* ``import-hf`` reported the NaN tensor as "tensors of the grown model were not sourced".

And ``train`` resuming a checkpoint with a damaged ``.distcp`` item (was torch's
``CheckpointException`` traceback) or a garbage ``common.pt`` (was torch's "re-run with
weights_only=False" advice): one line naming the file, exit 2.

Grow's NaN and damaged-shard cases are in test_grow_bad_input.py (the list of bad grow inputs).

    .venv/bin/pytest -q tests/distributed/test_nonfinite_checkpoints.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_grow.checkpoint import io, paths
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward, build_save_with_nan
from tests.distributed.conftest import REPO, write_recipe
from tests.distributed.test_grow_bad_input import tree_digest
from tests.unit.test_hostile_inputs import PREFIX, run_main

EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"


@pytest.fixture(scope="module")
def nan_run(kjv_dataset, tmp_path_factory) -> dict:
    """A run directory whose checkpoint's first expert fc1 weight holds one NaN; the model is the
    training recipe's (so train can resume it)."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    recipe = write_recipe(tmp / "model.yaml", kjv_dataset, tmp / "unused")
    root = str(tmp / "nan_run")
    run_in_processes(build_save_with_nan, 1, (load_recipe(recipe).model, ParallelConfig(), [(root, "linear_fc1")]))
    return {"root": root, "tmp": tmp}


def _train(recipe: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "megatron_grow", "train", "--config", recipe], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clean_run(kjv_dataset, tmp_path_factory) -> str:
    """A run directory with one finite checkpoint of the training recipe's model, by the real save."""
    tmp = tmp_path_factory.mktemp("damaged")
    recipe = write_recipe(tmp / "model.yaml", kjv_dataset, tmp / "unused")
    root = str(tmp / "run")
    run_in_processes(build_save_forward, 1, (load_recipe(recipe).model, ParallelConfig(), root))
    return root


def _flip_first_item_of(ckpt_dir: str, fqn: str) -> str:
    """XOR the zip header of ``fqn``'s first stored item in its real shard; returns the shard path."""
    md = io.read_storage_metadata(ckpt_dir)
    info = min((info for index, info in md.storage_data.items() if index.fqn.startswith(fqn)),
               key=lambda info: info.offset)
    path = os.path.join(ckpt_dir, info.relative_path)
    with open(path, "r+b") as f:
        f.seek(info.offset)
        header = f.read(40)
        f.seek(info.offset)
        f.write(bytes(b ^ 0xFF for b in header))
    return path


def _garbage_common_pt(ckpt_dir: str) -> str:
    path = os.path.join(ckpt_dir, "common.pt")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 4)  # not a zip, not a pickle torch accepts
    return path


@pytest.mark.parametrize("damage", ["flipped_shard", "garbage_common_pt"])
def test_train_resume_from_damaged_checkpoint_names_the_file(clean_run, kjv_dataset, tmp_path, damage):
    run = str(tmp_path / "run")
    shutil.copytree(clean_run, run)
    ckpt = paths.iteration_dir(run, 1)
    if damage == "flipped_shard":
        path, words = _flip_first_item_of(ckpt, EXPERT_FC1), ["is damaged", EXPERT_FC1]
    else:
        path, words = _garbage_common_pt(ckpt), ["unreadable"]
    recipe = write_recipe(tmp_path / "r.yaml", kjv_dataset, run)
    proc = _train(recipe)
    line = _one_line(proc.returncode, proc.stderr, path, *words)
    for advice in ("weights_only", "file an issue", "miniz"):
        assert advice not in line, line


def _one_line(code: int, err: str, *expect: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(PREFIX), err
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_inspect_stats_marks_the_nan_tensor_and_exits_2(nan_run):
    code, out, err = run_main(["inspect", nan_run["root"], "--stats", "--quiet"])
    _one_line(code, err, EXPERT_FC1, "1 NaN", "non-finite")
    row = next(line for line in out.splitlines() if line.strip().startswith(EXPERT_FC1 + " "))
    assert "NON-FINITE: 1 NaN" in row, row
    assert "nan" not in row.lower().replace("non-finite: 1 nan", ""), row  # the finite rest has real stats


def test_export_hf_refuses_nan_unless_allowed(nan_run, tmp_path):
    before = tree_digest(nan_run["root"])
    hf_dir = str(tmp_path / "hf")
    code, out, err = run_main(["export-hf", "--load", nan_run["root"], "--hf-dir", hf_dir, "--quiet"])
    _one_line(code, err, EXPERT_FC1, "layer 0, expert 0", "1 NaN", "--allow-nonfinite")
    assert not os.path.exists(hf_dir)
    code, out, err = run_main(["export-hf", "--load", nan_run["root"], "--hf-dir", hf_dir, "--quiet",
                               "--allow-nonfinite"])
    assert code == 0, err
    from safetensors.torch import load_file

    nan = sum(int(torch.isnan(t).sum()) for name in os.listdir(hf_dir) if name.endswith(".safetensors")
              for t in load_file(os.path.join(hf_dir, name)).values())
    assert nan == 1  # written as asked, exactly the one NaN
    assert tree_digest(nan_run["root"]) == before


def test_train_refuses_a_checkpoint_with_nan_weights(nan_run, kjv_dataset, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(nan_run["root"], run)
    recipe = write_recipe(tmp_path / "r.yaml", kjv_dataset, run, checkpoint={"load_optim": False})
    proc = _train(recipe)
    line = _one_line(proc.returncode, proc.stderr, "non-finite weights", "linear_fc1.weight", "1 NaN",
                     "cannot be trained from")
    assert "last good" not in line
    assert "[train] iter" not in proc.stdout  # refused on load, before any step


def test_import_hf_names_the_nan_tensor(tmp_path):
    from megatron_grow.interop.hf.tiny import make_tiny_model

    model = make_tiny_model("Qwen3MoeForCausalLM")
    name = "model.layers.1.self_attn.o_proj.weight"
    with torch.no_grad():
        model.get_parameter(name).view(-1)[5] = float("nan")
    hf_dir = str(tmp_path / "hf")
    model.save_pretrained(hf_dir, max_shard_size="200KB")
    save = str(tmp_path / "imported")
    code, out, err = run_main(["import-hf", "--hf-dir", hf_dir, "--save", save, "--quiet"])
    line = _one_line(code, err, name, "1 NaN", "non-finite", hf_dir)
    assert "not sourced" not in line
    assert not os.path.exists(save)
