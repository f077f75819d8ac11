"""scripts/slurm/* run for real on a private one-node SLURM cluster (tests/launch/conftest.py).

Tiny recipes on CPU (gloo), two ranks per job, through the unmodified sbatch scripts:

* pipeline.sh submits the whole base -> depth growth -> training -> width growth -> training
  chain as afterok jobs; every job completes, each training job resumes from its grow job's
  output, and the final checkpoint's lineage names both growth steps;
* preemption: ``scancel --signal=USR1`` and a job reaching its ``--signal=USR1@T`` warning
  make the trainer save and exit 3, train.sbatch requeue the job, and the requeued run resume
  from that checkpoint with the next step (no step repeated or skipped);
* a bad recipe fails its job with the one-line error in the job log, and the dependent jobs
  never start (DependencyNeverSatisfied).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.conftest import REPO, launcher_env, logged_steps, tiny_recipe

pytestmark = pytest.mark.slow

NO_GPUS = "--gpus-per-node=0"  # the sbatch scripts ask for 8 GPUs per node; this machine has none


def _log(cluster, job_id: str) -> str:
    path = Path(cluster.job(job_id)["StdOut"])
    return path.read_text() if path.exists() else ""


def _submitted(stderr: str) -> dict[str, str]:
    return dict(re.findall(r"^submitted (\S+) as job (\d+)$", stderr, re.M))


def test_pipeline_chain_runs_to_the_end(slurm_cluster, kjv_data, tmp_path):
    base = tiny_recipe(tmp_path / "base.yaml", kjv_data, train_iters=3)
    depth = tiny_recipe(tmp_path / "depth.yaml", kjv_data, train_iters=5,
                        growth={"order": ["depth"], "depth": {"mode": "interposition", "factor": 2}})
    width = tiny_recipe(tmp_path / "width.yaml", kjv_data, train_iters=7, num_layers=8,
                        growth={"order": ["width"], "width": {"factor": 2, "noise": "gaussian", "alpha": 0.01}})
    ckpt, logs = tmp_path / "ckpt", tmp_path / "logs"
    env = launcher_env(slurm_cluster.root, tmp_path, MG_CKPT_ROOT=ckpt, MG_LOG_DIR=logs,
                       MG_DATA_PATH=kjv_data["prefix"], MG_TOKENIZER_MODEL=kjv_data["tokenizer"],
                       MG_RECIPE_BASE=base, MG_RECIPE_DEPTH=depth, MG_RECIPE_WIDTH=width,
                       MG_NODES_17B=1, MG_NODES_35B=1, MG_NODES_70B=1, MG_TRAIN_TIME=10, MG_GROW_TIME=10,
                       MG_GROW_LAYOUT="--pipeline-model-parallel-size 1 --expert-model-parallel-size 1",
                       MG_SBATCH_ARGS=NO_GPUS, MG_GPUS_PER_NODE=1)  # one rank per job: 5 jobs on 2 cores
    started = time.monotonic()
    submit = slurm_cluster.run([REPO / "scripts" / "slurm" / "pipeline.sh"], env=env)
    jobs = _submitted(submit.stderr)
    assert list(jobs) == ["train-17b", "grow-depth", "train-35b", "grow-width", "train-70b"], submit.stderr
    ids = list(jobs.values())
    for previous, job_id in zip(ids, ids[1:]):
        assert slurm_cluster.job(job_id)["Dependency"].startswith(f"afterok:{previous}"), slurm_cluster.job(job_id)
    slurm_cluster.wait_chain(ids, timeout=900)
    elapsed = time.monotonic() - started
    for stage, job_id in jobs.items():
        info = slurm_cluster.job(job_id)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
            f"{stage}: {info}\n{_log(slurm_cluster, job_id)}"
    print(f"pipeline: 5 jobs completed in {elapsed:.0f} s")

    # The jobs ran one after another, each after the previous one ended.
    ends_starts = [(slurm_cluster.job(a)["EndTime"], slurm_cluster.job(b)["StartTime"]) for a, b in zip(ids, ids[1:])]
    assert all(end <= start for end, start in ends_starts), ends_starts
    # Each training job after a grow job resumed from what that grow job wrote.
    t35, t70 = _log(slurm_cluster, jobs["train-35b"]), _log(slurm_cluster, jobs["train-70b"])
    assert f"[train] resumed from {ckpt}/35b/iter_0000003 at iteration 3" in t35, t35
    assert "--grow-from is not applied again" in t35
    assert f"[train] resumed from {ckpt}/70b/iter_0000005 at iteration 5" in t70, t70
    assert [n for n, _ in logged_steps(t35)] == [4, 5]
    assert [n for n, _ in logged_steps(t70)] == [6, 7]

    manifest = json.loads((ckpt / "70b" / "iter_0000007" / "megatron_grow.json").read_text())
    lineage = manifest["lineage"]
    assert [step["operators"] for step in lineage] == [["depth"], ["width"]], lineage
    assert [Path(step["source_path"]).name for step in lineage] == ["17b_base", "35b"]
    assert [step["source_iteration"] for step in lineage] == [3, 5]
    assert manifest["model"]["num_layers"] == 8 and manifest["model"]["num_moe_experts"] == 16
    assert manifest["counters"]["iteration"] == 7


def _submit_training(cluster, tmp_path, recipe: Path, run_dir: Path, *sbatch_args: str) -> str:
    env = launcher_env(cluster.root, tmp_path)
    (tmp_path / "logs").mkdir(exist_ok=True)
    out = cluster.run(["sbatch", "--parsable", f"--chdir={REPO}", "--partition=debug", "--nodes=1", NO_GPUS,
                       f"--output={tmp_path}/logs/%x-%j.out", *sbatch_args, "scripts/slurm/train.sbatch",
                       "--config", recipe, f"checkpoint.save={run_dir}", f"checkpoint.load={run_dir}"], env=env)
    return out.stdout.strip().split(";")[0]


def _wait_log(cluster, job_id: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = _log(cluster, job_id)
        if re.search(pattern, text, re.M):
            return text
        state = cluster.job(job_id).get("JobState")
        if time.monotonic() > deadline or state in {"FAILED", "CANCELLED", "TIMEOUT", "COMPLETED"}:
            raise AssertionError(f"job {job_id} ({state}): no line matching {pattern!r} after {timeout} s:\n{text}")
        time.sleep(0.3)


def _check_preempted_then_resumed(text: str, run_dir: Path) -> tuple[int, list[int]]:
    """The log of a job preempted once: steps 1..k, save at k, exit 3, requeue, resume at k, k+1..."""
    first, _, second = text.partition("requeueing job")
    assert second, text
    saved = re.search(r"^\[train\] signal 10: saved at iteration (\d+), exiting with code 3$", first, re.M)
    assert saved, first
    k = int(saved.group(1))
    assert "a rank exited 3 (preempted, checkpoint saved)" in first
    assert re.search(r"^\[train\.sbatch\] trainer preempted and saved \(exit 3\)", first + "requeueing", re.M)
    assert re.search(r"^\[train\.sbatch\] job \d+ restart 1 on ", second, re.M), second
    assert f"[train] resumed from {run_dir}/iter_{k:07d} at iteration {k} " in second, second
    steps_before = [n for n, _ in logged_steps(first)]
    steps_after = [n for n, _ in logged_steps(second)]
    assert steps_before == list(range(1, k + 1)), steps_before
    assert steps_after == list(range(k + 1, k + 1 + len(steps_after))), steps_after
    return k, steps_before + steps_after


def test_scancel_usr1_saves_requeues_and_resumes(slurm_cluster, kjv_data, tmp_path):
    """scancel --signal=USR1 -> save, exit 3, scontrol requeue -> the same job resumes and completes."""
    iters = 40
    recipe = tiny_recipe(tmp_path / "r.yaml", kjv_data, train_iters=iters)  # no interval saves
    run_dir = tmp_path / "run"
    job = _submit_training(slurm_cluster, tmp_path, recipe, run_dir, "--time=10", "--job-name=mg-preempt")
    started = time.monotonic()
    _wait_log(slurm_cluster, job, r"^\[train\] iter\s+2 \|", timeout=300)
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    signalled = time.monotonic()
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    text = _log(slurm_cluster, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{info}\n{text}"
    k, steps = _check_preempted_then_resumed(text, run_dir)
    assert k < iters and steps == list(range(1, iters + 1)), steps
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
    print(f"scancel USR1: saved at {k}, requeued, resumed, completed {iters} steps; "
          f"{signalled - started:.0f} s to signal, {time.monotonic() - signalled:.0f} s to completion")


def test_time_limit_warning_saves_requeues_and_resumes(slurm_cluster, kjv_data, tmp_path):
    """A job reaching its --signal=USR1@T warning saves, exits 3 and is requeued; the rerun resumes."""
    recipe = tiny_recipe(tmp_path / "r.yaml", kjv_data, train_iters=100_000)  # runs until the warning
    run_dir = tmp_path / "run"
    # SLURM signals every process of the step, so a warning during start-up would also hit the C++
    # compiler torch.compile runs then: leave >= 80 s for start-up on a loaded machine.
    job = _submit_training(slurm_cluster, tmp_path, recipe, run_dir, "--time=3", "--signal=USR1@100",
                           "--job-name=mg-timelimit")
    started = time.monotonic()
    _wait_log(slurm_cluster, job, r"requeueing job", timeout=300)
    preempted = time.monotonic()
    text = _wait_log(slurm_cluster, job, r"resumed from[\s\S]*^\[train\] iter\s+\d+ \|[\s\S]*^\[train\] iter", 200)
    slurm_cluster.run(["scancel", job])  # the rerun would run to its own warning; enough seen
    k, steps = _check_preempted_then_resumed(text, run_dir)
    assert "SIGUSR1: forwarding to the ranks" in text
    print(f"--signal=USR1@100 with --time=3: saved at {k} after {preempted - started:.0f} s, requeued, "
          f"resumed at {k + 1}")


def test_bad_recipe_fails_its_job_and_dependents_never_start(slurm_cluster, kjv_data, tmp_path):
    bad = tmp_path / "bad.yaml"
    recipe = yaml.safe_load(tiny_recipe(tmp_path / "good.yaml", kjv_data, train_iters=3).read_text())
    recipe["training"]["train_iterz"] = 3
    bad.write_text(yaml.safe_dump(recipe))
    env = launcher_env(slurm_cluster.root, tmp_path, MG_CKPT_ROOT=tmp_path / "ckpt", MG_LOG_DIR=tmp_path / "logs",
                       MG_DATA_PATH=kjv_data["prefix"], MG_TOKENIZER_MODEL=kjv_data["tokenizer"],
                       MG_RECIPE_BASE=bad, MG_RECIPE_DEPTH=tmp_path / "good.yaml",
                       MG_NODES_17B=1, MG_NODES_35B=1, MG_SBATCH_ARGS=NO_GPUS, MG_GPUS_PER_NODE=1)
    submit = slurm_cluster.run([REPO / "scripts" / "slurm" / "pipeline.sh", "--stop-after", "train-35b"], env=env)
    jobs = _submitted(submit.stderr)
    ids = list(jobs.values())
    assert len(ids) == 3, submit.stderr
    info = slurm_cluster.wait_for(ids[0], {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = _log(slurm_cluster, ids[0])
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), f"{info}\n{text}"
    # The loader's message: one "error:" line naming the file, then one line per bad key.
    lines = text.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("megatron-grow: error:")]
    assert len(errors) == 1, text
    message = " ".join(lines[errors[0]:errors[0] + 2])
    assert str(bad) in message and "training.train_iterz: unknown key" in message, text
    assert not re.search(r'File ".*megatron_grow/', text), "a traceback from our code"  # torchrun adds its own
    # The direct dependent can never run; the one after it waits on that one (SLURM marks only
    # jobs whose own dependency failed). Neither starts.
    deadline = time.monotonic() + 60
    while slurm_cluster.job(ids[1])["Reason"] != "DependencyNeverSatisfied" and time.monotonic() < deadline:
        time.sleep(1)
    dependents = [slurm_cluster.job(j) for j in ids[1:]]
    assert dependents[0]["Reason"] == "DependencyNeverSatisfied", dependents[0]
    for d in dependents:
        assert (d["JobState"], d["StartTime"]) == ("PENDING", "Unknown"), d
        assert d["Reason"] in ("DependencyNeverSatisfied", "Dependency"), d
    assert not list((tmp_path / "logs").glob("mg-grow-35b-*")), "a dependent job wrote a log"
    slurm_cluster.run(["scancel", *ids[1:]])
    print(f"bad recipe: job {ids[0]} FAILED exit 2 with {message!r}; jobs {ids[1:]} never started "
          f"({', '.join(d['Reason'] for d in dependents)})")
