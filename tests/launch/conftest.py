"""A private one-node SLURM cluster for the launcher tests, and helpers to drive it.

The cluster is ``scripts/slurm/local_cluster.sh`` (the same commands docs/launching.md gives
users): Debian's slurmctld + slurmd on 127.0.0.1 with their own slurm.conf, ports, state,
spool, pid and log files and their own munge daemon, key and socket, all in a temporary
directory. Teardown cancels the cluster's jobs and stops only the daemons it started (their
pid files). Without the packages or without root the tests skip, saying why; ``make test``
installs the packages on Debian as root (scripts/slurm/install_packages.sh).
"""

from __future__ import annotations

import gzip
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
CORPUS = REPO / "data" / "corpus" / "kjv.txt.gz"
VENV = Path(sys.executable).parent.parent
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
NEEDED = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "sinfo")


def slurm_missing_reason() -> str | None:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge "
                "as root on Debian (make test does this when it can)")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as the submitting user)"
    return None


def free_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768+), where no process that binds port 0
    (other test runs on a shared machine) can take it between now and the rendezvous."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port == 29500:  # torchrun's default
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-32000")


class Cluster:
    """The running cluster: its directory, environment, and job queries."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
                    "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def run(self, args, env=None, check=True, timeout=60) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in args], env={**self.env, **(env or {})}, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (finished jobs stay visible for MinJobAge = 600 s)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", out))

    def wait_chain(self, job_ids: list[str], timeout: float) -> None:
        """Until the last job of an afterok chain ends, or any job ends other than COMPLETED."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self.job(j).get("JobState") for j in job_ids]
            if states[-1] in ENDED or any(s in ENDED - {"COMPLETED"} for s in states):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs {job_ids} still {states} after {timeout} s")
            time.sleep(1)

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s "
                                     f"(wanted {sorted(states)}): {info}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = slurm_missing_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(SLURM_SCRIPTS / "local_cluster.sh"), "up", str(root), "--cpus", "2"],
                        capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "local_cluster.sh"), "down", str(root)], capture_output=True)
        raise AssertionError(f"local SLURM cluster did not start:\n{up.stdout}\n{up.stderr}")
    try:
        yield Cluster(root)
    finally:
        down = subprocess.run(["bash", str(SLURM_SCRIPTS / "local_cluster.sh"), "down", str(root)],
                              capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="session")
def kjv_data(tmp_path_factory):
    """A 512-piece sentencepiece model and the first ~300 KB of the corpus as an indexed dataset."""
    from megatron_grow.data.preprocess import preprocess
    from megatron_grow.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("kjv_launch")
    text = root / "kjv_part.txt"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text.write_text(f.read(300_000), encoding="utf-8")
    train_tokenizer([str(text)], str(root / "tok"), 512)
    preprocess([str(text)], str(root / "tok.model"), str(root / "kjv"), workers=1)
    return {"tokenizer": str(root / "tok.model"), "prefix": str(root / "kjv")}


def tiny_recipe(path: Path, data: dict, *, train_iters: int, num_layers: int = 4, growth: dict | None = None,
                save_interval: int = 1000, **training) -> Path:
    """A tiny-model recipe (configs/models/tiny.yaml) over ``data``; checkpoint dirs come from the launchers."""
    recipe = {
        "include": str(REPO / "configs" / "models" / "tiny.yaml"),
        "model": {"vocab_size": 512, "seq_length": 32, "num_layers": num_layers},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": train_iters, "lr": 3.0e-3,
                     "min_lr": 3.0e-4, "lr_decay_style": "constant", "eval_interval": 1000, "eval_iters": 1,
                     **training},
        "data": {"data_path": [data["prefix"]], "tokenizer_model": data["tokenizer"], "split": "95,5,0"},
        "checkpoint": {"save_interval": save_interval, "keep_last": 10},
        "logging": {"log_interval": 1},
    }
    if growth is not None:
        recipe["growth"] = growth
    path.write_text(yaml.safe_dump(recipe))
    return path


def launcher_env(cluster_root: Path, tmp_path: Path, **extra) -> dict:
    """Settings for scripts/slurm/* on the local cluster: no container, this venv, no GPUs."""
    empty = tmp_path / "cluster.env"
    empty.write_text("")
    env = {"MG_CLUSTER_ENV": str(empty), "MG_ACCOUNT": "", "MG_PARTITION": "debug", "MG_CONTAINER_IMAGE": "",
           "MG_VENV": str(VENV), "MG_DATA_PATH": "", "MG_TOKENIZER_MODEL": "", "MG_GPUS_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def logged_steps(text: str) -> list[tuple[int, float]]:
    """(iteration, loss) of every ``[train] iter N | loss L`` line, in log order."""
    return [(int(n), float(loss)) for n, loss in re.findall(r"^\[train\] iter\s+(\d+) \| loss ([0-9.]+)", text, re.M)]
