"""The launchers under scripts/ and the paper recipes they run.

* every shell script passes ``bash -n`` and ``shellcheck -x`` (CI installs shellcheck; the
  lint test skips, with the reason, only when it is missing);
* every dry run prints exactly the expected command lines (parsed with ``shlex``);
* ``scripts/slurm/node.sh`` + ``rank.sh`` under a real torchrun deliver SIGUSR1 to the ranks
  and turn a rank's exit code 3 ("preempted, checkpoint saved") into the node's exit code;
* the paper recipes carry the step and FLOPs arithmetic their comments state, and their
  grown models fit an H100 in the stated layout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "scripts" / "slurm"
TORCHRUN = REPO / "scripts" / "torchrun"
GPU = REPO / "scripts" / "gpu"
SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch"), SLURM / "cluster.env.example",
                  *TORCHRUN.glob("*.sh"), *GPU.glob("*.sh")])
EXECUTABLES = ["slurm/pipeline.sh", "slurm/node.sh", "slurm/rank.sh", "slurm/local_cluster.sh",
               "slurm/install_packages.sh", "torchrun/train.sh", "torchrun/grow.sh", "torchrun/sunk_cost_sweep.sh"]
TOKENS_PER_STEP = 1024 * 4096
VENV_BIN = str(Path(sys.executable).parent)


def _ids(paths):
    return [p.relative_to(REPO).as_posix() for p in paths]


def run(args, env=None, cwd=REPO, timeout=120):
    """Run a launcher with a clean, explicit environment (no cluster settings leak in)."""
    base = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHON": sys.executable}
    base.update(env or {})
    return subprocess.run([str(a) for a in args], cwd=cwd, env=base, capture_output=True, text=True,
                          timeout=timeout)


def command_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture
def cluster_env(tmp_path):
    """An empty cluster file, so a developer's scripts/slurm/cluster.env cannot change the results."""
    path = tmp_path / "cluster.env"
    path.write_text("")
    return {"MG_CLUSTER_ENV": str(path)}


# ---------------------------------------------------------------------------------------------
# Lint


def test_scripts_are_found():
    names = set(_ids(SCRIPTS))
    expected = {f"scripts/{n}" for n in ("slurm/train.sbatch", "slurm/grow.sbatch", "slurm/pipeline.sh",
                                          "slurm/lib.sh", "slurm/node.sh", "slurm/rank.sh",
                                          "slurm/cluster.env.example", "torchrun/train.sh", "torchrun/grow.sh",
                                          "torchrun/sunk_cost_sweep.sh", "torchrun/common.sh")}
    assert expected <= names


@pytest.mark.parametrize("name", EXECUTABLES)
def test_entry_scripts_are_executable(name):
    assert os.access(REPO / "scripts" / name, os.X_OK), f"chmod +x scripts/{name}"


@pytest.mark.parametrize("path", SCRIPTS, ids=_ids(SCRIPTS))
def test_bash_syntax(path):
    result = run(["bash", "-n", path])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=_ids(SCRIPTS))
def test_shellcheck(path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    # -x follows `source` directives; their paths are relative to the repository root.
    result = subprocess.run([shellcheck, "-x", "--shell=bash", str(path.relative_to(REPO))], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# scripts/torchrun


def test_train_sh_dry_run():
    result = run([TORCHRUN / "train.sh", "--config", "configs/recipes/17b_base.yaml", "--grow-from", "/ck/src",
                  "--dry-run", "training.lr=1e-4", "data.data_path=[/d/a, /d/b]"], env={"NPROC": "3"})
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [[
        sys.executable, "-m", "megatron_grow", "launch", "--standalone", "--nnodes", "1", "--nproc-per-node", "3",
        "train",
        "--config", "configs/recipes/17b_base.yaml", "--grow-from", "/ck/src",
        "training.lr=1e-4", "data.data_path=[/d/a, /d/b]"]]


def test_train_sh_nproc_default_and_torchrun_args():
    result = run([TORCHRUN / "train.sh", "--dry-run", "--config", "r.yaml"],
                 env={"TORCHRUN_ARGS": "--master-port 29600"})
    assert result.returncode == 0, result.stderr
    (cmd,) = command_lines(result.stdout)
    nproc = int(cmd[cmd.index("--nproc-per-node") + 1])
    if shutil.which("nvidia-smi") is None:
        assert nproc == 1
    else:
        assert nproc >= 1
    assert cmd[cmd.index("--master-port") + 1] == "29600"
    assert cmd[:4] == [sys.executable, "-m", "megatron_grow", "launch"]
    assert cmd[-3:] == ["train", "--config", "r.yaml"]


def test_train_sh_needs_config():
    result = run([TORCHRUN / "train.sh", "--dry-run", "training.lr=1"])
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_grow_sh_dry_run():
    result = run([TORCHRUN / "grow.sh", "--dry-run", "--load", "/ck/17b/iter_0143052", "--save", "/ck/35b",
                  "--recipe", "configs/recipes/17b_to_35b_depth.yaml", "--pipeline-model-parallel-size", "1",
                  "growth.seed=7"], env={"NPROC": "8"})
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [[
        sys.executable, "-m", "megatron_grow", "launch", "--standalone", "--nnodes", "1", "--nproc-per-node", "8",
        "grow",
        "--load", "/ck/17b/iter_0143052", "--save", "/ck/35b", "--recipe", "configs/recipes/17b_to_35b_depth.yaml",
        "--pipeline-model-parallel-size", "1", "growth.seed=7"]]


@pytest.mark.parametrize("missing", ["--load", "--save", "--recipe"])
def test_grow_sh_needs_its_flags(missing):
    args = {"--load": "a", "--save": "b", "--recipe": "c"}
    del args[missing]
    result = run([TORCHRUN / "grow.sh", "--dry-run", *[x for kv in args.items() for x in kv]])
    assert result.returncode == 2
    assert missing in result.stderr


def _make_run_dir(root: Path, iterations) -> Path:
    for it in iterations:
        (root / f"iter_{it:07d}").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(max(iterations)))
    return root


@pytest.mark.slow
def test_sunk_cost_sweep_dry_run(tmp_path):
    run_dir = _make_run_dir(tmp_path / "3b_base", [0, 500, 8000, 16000, 96000])
    out = tmp_path / "sweep"
    recipe = "configs/recipes/ablations/sunk_cost_sweep.yaml"
    result = run([TORCHRUN / "sunk_cost_sweep.sh", "--run-dir", run_dir, "--out", out, "--every", "8000",
                  "--dry-run", "--", "training.eval_iters=5"])
    assert result.returncode == 0, result.stderr
    # 3e20 FLOPs / FLOPs per step of the grown 6B (megatron_grow.training.flops) = 8,132.8 -> 8,133.
    assert "extra steps per sweep point: 8133" in result.stderr
    expected = []
    for it in (8000, 16000, 96000):
        src, dst = f"{run_dir}/iter_{it:07d}", f"{out}/from_iter_{it:07d}"
        expected.append([str(TORCHRUN / "grow.sh"), "--load", src, "--save", dst, "--recipe", recipe])
        expected.append([str(TORCHRUN / "train.sh"), "--config", recipe, "--grow-from", src,
                         f"checkpoint.load={dst}", f"checkpoint.save={dst}", f"training.train_iters={it + 8133}",
                         "training.eval_iters=5"])
    assert command_lines(result.stdout) == expected
    assert not out.exists(), "a dry run must not create anything"


def test_sunk_cost_sweep_skips_grown_points_and_takes_extra_steps(tmp_path):
    run_dir = _make_run_dir(tmp_path / "run", [100, 200])
    out = tmp_path / "out"
    (out / "from_iter_0000100").mkdir(parents=True)
    (out / "from_iter_0000100" / "latest_checkpointed_iteration.txt").write_text("100")
    result = run([TORCHRUN / "sunk_cost_sweep.sh", "--run-dir", run_dir, "--out", out, "--extra-steps", "10",
                  "--recipe", "configs/recipes/ablations/sunk_cost_sweep.yaml", "--dry-run"])
    assert result.returncode == 0, result.stderr
    lines = command_lines(result.stdout)
    assert [Path(c[0]).name for c in lines] == ["train.sh", "grow.sh", "train.sh"]
    assert "training.train_iters=110" in lines[0] and "training.train_iters=210" in lines[2]
    assert "not growing again" in result.stderr


def test_sunk_cost_sweep_without_checkpoints_fails(tmp_path):
    (tmp_path / "run").mkdir()
    result = run([TORCHRUN / "sunk_cost_sweep.sh", "--run-dir", tmp_path / "run", "--out", tmp_path / "o",
                  "--extra-steps", "1", "--dry-run"])
    assert result.returncode == 2
    assert "no iter_* checkpoints" in result.stderr


# ---------------------------------------------------------------------------------------------
# scripts/slurm: the .sbatch files


SLURM_ENV = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]",
             "MASTER_ADDR": "gpu01", "MASTER_PORT": "29555", "MG_GPUS_PER_NODE": "8"}


def _torchrun_part(nnodes="2", job="4242", endpoint="gpu01:29555"):
    return ["torchrun", "--nnodes", nnodes, "--nproc-per-node", "8", "--rdzv-id", job, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--max-restarts", "0"]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_train_sbatch_dry_run(cluster_env, how):
    env = {**SLURM_ENV, **cluster_env, "MG_CONTAINER_IMAGE": "/img/mg.sqsh", "MG_CONTAINER_MOUNTS": "/lustre:/lustre",
           "MG_DATA_PATH": "0.5 /d/a_text 0.5 /d/b_text", "MG_TOKENIZER_MODEL": "/d/tok.model"}
    args = ["--config", "configs/recipes/17b_to_35b_depth.yaml", "--grow-from", "/ck/17b_base",
            "checkpoint.save=/ck/35b", "checkpoint.load=/ck/35b"]
    if how == "env":
        env["DRY_RUN"] = "1"
    else:
        args.insert(0, "--dry-run")
    result = run(["bash", SLURM / "train.sbatch", *args], env=env)
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [[
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--container-image=/img/mg.sqsh",
        f"--container-mounts={REPO}:{REPO},/lustre:/lustre", f"--container-workdir={REPO}",
        "bash", "scripts/slurm/node.sh", *_torchrun_part(),
        "--no-python", "bash", "scripts/slurm/rank.sh", "python", "-u", "-m", "megatron_grow", "train",
        "--config", "configs/recipes/17b_to_35b_depth.yaml", "--grow-from", "/ck/17b_base",
        "data.data_path=[0.5, /d/a_text, 0.5, /d/b_text]", "data.tokenizer_model=/d/tok.model",
        "checkpoint.save=/ck/35b", "checkpoint.load=/ck/35b"]]


def test_train_sbatch_without_container_or_data(cluster_env):
    env = {**SLURM_ENV, **cluster_env, "MG_CONTAINER_IMAGE": "", "MG_DATA_PATH": "", "MG_TOKENIZER_MODEL": "",
           "DRY_RUN": "1"}
    result = run(["bash", SLURM / "train.sbatch", "--config", "r.yaml"], env=env)
    assert result.returncode == 0, result.stderr
    (cmd,) = command_lines(result.stdout)
    assert cmd[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "bash"]
    assert cmd[-5:] == ["-m", "megatron_grow", "train", "--config", "r.yaml"]
    assert not any(a.startswith("data.") for a in cmd)


@pytest.mark.parametrize("var", ["MG_CONTAINER_IMAGE", "MG_DATA_PATH", "MG_TOKENIZER_MODEL"])
def test_train_sbatch_names_a_missing_variable(cluster_env, var):
    env = {**SLURM_ENV, **cluster_env, "MG_CONTAINER_IMAGE": "", "MG_DATA_PATH": "", "MG_TOKENIZER_MODEL": "",
           "DRY_RUN": "1"}
    del env[var]
    result = run(["bash", SLURM / "train.sbatch", "--config", "r.yaml"], env=env)
    assert result.returncode == 2
    assert var in result.stderr and "cluster.env" in result.stderr


def test_train_sbatch_outside_slurm_refuses_to_run(cluster_env):
    env = {**cluster_env, "MG_CONTAINER_IMAGE": "", "MG_DATA_PATH": "", "MG_TOKENIZER_MODEL": ""}
    result = run(["bash", SLURM / "train.sbatch", "--config", "r.yaml"], env=env)
    assert result.returncode == 2
    assert "sbatch" in result.stderr


def test_cluster_file_is_read_and_environment_wins(tmp_path):
    cluster = tmp_path / "cluster.env"
    cluster.write_text("MG_CONTAINER_IMAGE=\nMG_DATA_PATH=/file/prefix\nMG_TOKENIZER_MODEL=/file/tok.model\n")
    base = {**SLURM_ENV, "MG_CLUSTER_ENV": str(cluster), "DRY_RUN": "1"}
    (cmd,) = command_lines(run(["bash", SLURM / "train.sbatch", "--config", "r.yaml"], env=base).stdout)
    assert "data.data_path=[/file/prefix]" in cmd and "data.tokenizer_model=/file/tok.model" in cmd
    (cmd,) = command_lines(run(["bash", SLURM / "train.sbatch", "--config", "r.yaml"],
                               env={**base, "MG_DATA_PATH": "/env/prefix"}).stdout)
    assert "data.data_path=[/env/prefix]" in cmd and "data.tokenizer_model=/file/tok.model" in cmd


def test_missing_cluster_file_is_an_error(tmp_path):
    env = {**SLURM_ENV, "MG_CLUSTER_ENV": str(tmp_path / "nope.env"), "DRY_RUN": "1"}
    result = run(["bash", SLURM / "train.sbatch", "--config", "r.yaml"], env=env)
    assert result.returncode == 2
    assert "MG_CLUSTER_ENV" in result.stderr


def test_grow_sbatch_dry_run(cluster_env):
    env = {**SLURM_ENV, **cluster_env, "SLURM_NNODES": "1", "MG_CONTAINER_IMAGE": "", "DRY_RUN": "1"}
    result = run(["bash", SLURM / "grow.sbatch", "--load", "/ck/35b", "--save", "/ck/70b", "--recipe",
                  "configs/recipes/35b_to_70b_width.yaml", "--pipeline-model-parallel-size", "1"], env=env)
    assert result.returncode == 0, result.stderr
    assert command_lines(result.stdout) == [[
        "srun", "--ntasks-per-node=1", "bash", "scripts/slurm/node.sh", *_torchrun_part(nnodes="1"),
        "--no-python", "bash", "scripts/slurm/rank.sh", "python", "-u", "-m", "megatron_grow", "grow",
        "--load", "/ck/35b", "--save", "/ck/70b", "--recipe", "configs/recipes/35b_to_70b_width.yaml",
        "--pipeline-model-parallel-size", "1"]]


def test_grow_sbatch_needs_its_flags(cluster_env):
    env = {**SLURM_ENV, **cluster_env, "MG_CONTAINER_IMAGE": "", "DRY_RUN": "1"}
    result = run(["bash", SLURM / "grow.sbatch", "--load", "a", "--recipe", "r.yaml"], env=env)
    assert result.returncode == 2
    assert "--save" in result.stderr


def test_sbatch_headers():
    for name, signal_line in (("train.sbatch", True), ("grow.sbatch", False)):
        text = (SLURM / name).read_text()
        assert "#SBATCH --output=logs/%x-%j.out" in text
        assert "#SBATCH --ntasks-per-node=1" in text
        assert "#SBATCH --requeue" in text
        assert ("#SBATCH --signal=USR1@300" in text) == signal_line
    text = (SLURM / "train.sbatch").read_text()
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "MG_EXIT_PREEMPTED=3" in (SLURM / "lib.sh").read_text()


# ---------------------------------------------------------------------------------------------
# scripts/slurm/pipeline.sh


PIPELINE_ENV = {"MG_ACCOUNT": "acct", "MG_PARTITION": "gpu", "MG_CONTAINER_IMAGE": "/img/mg.sqsh",
                "MG_DATA_PATH": "/d/corpus", "MG_TOKENIZER_MODEL": "/d/tok.model", "MG_CKPT_ROOT": "/ck"}


def _opt(cmd, prefix):
    hits = [a for a in cmd if a.startswith(prefix)]
    return hits[0][len(prefix):] if hits else None


def _after(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_pipeline_dry_run_chain(cluster_env):
    result = run([SLURM / "pipeline.sh", "--dry-run"], env={**PIPELINE_ENV, **cluster_env})
    assert result.returncode == 0, result.stderr
    jobs = command_lines(result.stdout)
    assert len(jobs) == 5
    for i, cmd in enumerate(jobs, start=1):
        assert cmd[:2] == ["sbatch", "--parsable"]
        assert _opt(cmd, "--account=") == "acct" and _opt(cmd, "--partition=") == "gpu"
        assert _opt(cmd, "--chdir=") == str(REPO)
        assert _opt(cmd, "--dependency=") == (None if i == 1 else f"afterok:DRYRUN{i - 1}")
    scripts = [next(a for a in cmd if a.endswith(".sbatch")) for cmd in jobs]
    assert scripts == ["scripts/slurm/train.sbatch", "scripts/slurm/grow.sbatch", "scripts/slurm/train.sbatch",
                       "scripts/slurm/grow.sbatch", "scripts/slurm/train.sbatch"]
    t17, g35, t35, g70, t70 = jobs
    assert _after(t17, "--config") == "configs/recipes/17b_base.yaml"
    assert _after(g35, "--recipe") == "configs/recipes/17b_to_35b_depth.yaml"
    assert _after(t35, "--config") == "configs/recipes/17b_to_35b_depth.yaml"
    assert _after(g70, "--recipe") == "configs/recipes/35b_to_70b_width.yaml"
    assert _after(t70, "--config") == "configs/recipes/35b_to_70b_width.yaml"
    # Checkpoint hand-over: each grow reads the previous training's directory, each training
    # resumes (load == save) from the directory its grow job wrote.
    assert _opt(t17, "checkpoint.save=") == _opt(t17, "checkpoint.load=") == "/ck/17b_base"
    assert (_after(g35, "--load"), _after(g35, "--save")) == ("/ck/17b_base", "/ck/35b")
    assert _opt(t35, "checkpoint.save=") == _opt(t35, "checkpoint.load=") == "/ck/35b"
    assert _after(t35, "--grow-from") == "/ck/17b_base"
    assert (_after(g70, "--load"), _after(g70, "--save")) == ("/ck/35b", "/ck/70b")
    assert _opt(t70, "checkpoint.save=") == _opt(t70, "checkpoint.load=") == "/ck/70b"
    assert _after(t70, "--grow-from") == "/ck/35b"
    assert "--grow-from" not in t17
    # Options come before the key=value overrides (argparse takes the overrides as one run).
    for cmd in (t17, t35, t70):
        tail = cmd[cmd.index("scripts/slurm/train.sbatch") + 1:]
        first_override = next(i for i, a in enumerate(tail) if "=" in a)
        assert all("=" in a for a in tail[first_override:])
    assert [_opt(c, "--nodes=") for c in jobs] == ["8", "1", "8", "1", "8"]


def test_pipeline_recipes_exist_and_load(cluster_env):
    from megatron_grow.config.loader import load_recipe

    jobs = command_lines(run([SLURM / "pipeline.sh", "--dry-run"], env={**PIPELINE_ENV, **cluster_env}).stdout)
    for cmd in jobs:
        flag = "--config" if "--config" in cmd else "--recipe"
        recipe = load_recipe(str(REPO / _after(cmd, flag)))
        assert recipe.model.seq_length == 4096


def test_pipeline_start_at_and_after(cluster_env):
    env = {**PIPELINE_ENV, **cluster_env, "MG_ACCOUNT": "", "MG_NODES_70B": "16"}
    result = run([SLURM / "pipeline.sh", "--dry-run", "--start-at", "grow-width", "--after", "777"], env=env)
    assert result.returncode == 0, result.stderr
    g70, t70 = command_lines(result.stdout)
    assert _opt(g70, "--dependency=") == "afterok:777"
    assert _opt(t70, "--dependency=") == "afterok:DRYRUN4"  # grow-width is stage 4
    assert _opt(t70, "--nodes=") == "16"
    assert _opt(g70, "--account=") is None  # empty MG_ACCOUNT: no --account


@pytest.mark.parametrize("var", ["MG_ACCOUNT", "MG_PARTITION", "MG_CONTAINER_IMAGE", "MG_DATA_PATH",
                                 "MG_TOKENIZER_MODEL", "MG_CKPT_ROOT"])
def test_pipeline_names_a_missing_variable(cluster_env, var):
    env = {**PIPELINE_ENV, **cluster_env}
    del env[var]
    result = run([SLURM / "pipeline.sh", "--dry-run"], env=env)
    assert result.returncode == 2
    assert var in result.stderr
    assert result.stdout == ""


def test_pipeline_rejects_unknown_stage(cluster_env):
    result = run([SLURM / "pipeline.sh", "--dry-run", "--start-at", "nope"], env={**PIPELINE_ENV, **cluster_env})
    assert result.returncode == 2
    assert "train-17b" in result.stderr


# ---------------------------------------------------------------------------------------------
# node.sh + rank.sh under a real torchrun: signal delivery and the exit-code contract

WORKER = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
open(os.path.join(os.environ["READY_DIR"], "ready-" + os.environ["RANK"]), "w").close()
mode = os.environ["WORKER_MODE"]
if mode != "wait":
    sys.exit(int(mode))
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
sys.exit(3 if got else 0)
"""


def _node_launch(tmp_path, mode, send_usr1):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "READY_DIR": str(ready), "WORKER_MODE": mode, "TMPDIR": str(tmp_path)}
    cmd = ["bash", str(SLURM / "node.sh"), "torchrun", "--standalone", "--nproc-per-node", "2", "--no-python",
           "bash", str(SLURM / "rank.sh"), sys.executable, str(worker)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if send_usr1:
            deadline = time.time() + 90
            while len(list(ready.iterdir())) < 2:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "workers did not start"
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)  # to node.sh only, as SLURM's proctrack/pgid would
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.slow
def test_node_sh_forwards_usr1_and_returns_preempted_code(tmp_path):
    rc, out = _node_launch(tmp_path, "wait", send_usr1=True)
    assert rc == 3, out
    assert "forwarding" in out and "preempted" in out
    assert not list(tmp_path.glob("mg-ranks.*")), "node.sh must remove its status directory"


@pytest.mark.slow
def test_node_sh_success_is_zero(tmp_path):
    rc, out = _node_launch(tmp_path, "0", send_usr1=False)
    assert rc == 0, out


@pytest.mark.slow
def test_node_sh_other_failures_are_not_preemption(tmp_path):
    # torchrun reports any worker failure as 1; node.sh passes the rank's own code on (3 only for 3).
    rc, out = _node_launch(tmp_path, "5", send_usr1=False)
    assert rc == 5, out
    assert "a rank exited 5" in out


# ---------------------------------------------------------------------------------------------
# The paper recipes: the arithmetic in their comments, and the grown models fit an H100


def _grown(path):
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.growth.plan import make_growth_plan

    recipe = load_recipe(str(REPO / path))
    if recipe.growth is not None:
        recipe = dataclasses.replace(recipe, model=make_growth_plan(recipe.model, recipe.growth).target, growth=None)
    return recipe


def _flops_per_token(path):
    from megatron_grow.training.flops import training_flops_per_token

    return training_flops_per_token(_grown(path).model).total


def test_paper_recipe_steps():
    base, depth, width = (_grown(f"configs/recipes/{n}.yaml") for n in ("17b_base", "17b_to_35b_depth",
                                                                        "35b_to_70b_width"))
    for r in (base, depth, width):
        assert r.training.global_batch_size * r.model.seq_length == TOKENS_PER_STEP
    assert base.training.train_iters == math.ceil(600e9 / TOKENS_PER_STEP)
    assert base.training.lr_decay_style == "WSD"
    assert depth.training.train_iters == base.training.train_iters + math.ceil(300e9 / TOKENS_PER_STEP)
    assert width.training.train_iters == depth.training.train_iters + math.ceil(100e9 / TOKENS_PER_STEP)
    assert depth.training.lr_decay_style == width.training.lr_decay_style == "constant"
    assert (depth.model.num_layers, depth.model.num_moe_experts, depth.model.moe_router_topk) == (56, 96, 6)
    assert (width.model.num_layers, width.model.num_moe_experts, width.model.moe_router_topk) == (56, 192, 12)


def test_70b_scratch_matches_the_grown_chain_compute():
    from megatron_grow.config.loader import load_recipe

    base = load_recipe(str(REPO / "configs/recipes/17b_base.yaml")).training.train_iters
    depth = load_recipe(str(REPO / "configs/recipes/17b_to_35b_depth.yaml")).training.train_iters
    width = load_recipe(str(REPO / "configs/recipes/35b_to_70b_width.yaml")).training.train_iters
    f35 = _flops_per_token("configs/recipes/17b_to_35b_depth.yaml")
    f70 = _flops_per_token("configs/recipes/35b_to_70b_width.yaml")
    extra = (f35 * (depth - base) + f70 * (width - depth)) * TOKENS_PER_STEP
    scratch = _grown("configs/recipes/70b_scratch.yaml")
    assert _flops_per_token("configs/recipes/70b_scratch.yaml") == f70
    assert scratch.training.train_iters == math.ceil(extra / (f70 * TOKENS_PER_STEP))


@pytest.mark.parametrize("name", ["17b_base", "17b_to_35b_depth", "35b_to_70b_width", "70b_scratch"])
def test_paper_recipe_fits_h100_on_8_nodes(name):
    from megatron_grow.analysis.run_estimate import estimate_run

    recipe = _grown(f"configs/recipes/{name}.yaml")
    plan = estimate_run(recipe, 64)
    assert plan["memory_fits_h100"], plan["memory_per_gpu_gib"]
    assert plan["layout"]["ep"] == 8 and plan["layout"]["tp"] == 1  # experts inside a node, no TP


def test_k_only_ablation_is_a_training_recipe():
    from megatron_grow.config.loader import load_recipe

    r = load_recipe(str(REPO / "configs/recipes/ablations/width_k_only.yaml"))
    assert r.growth is None and r.model.num_moe_experts == 64 and r.model.moe_router_topk == 8
    assert r.checkpoint.load_optim is False
