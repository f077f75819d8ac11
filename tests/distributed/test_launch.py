"""``megatron-grow launch`` (torchrun in-process) keeps exit codes 2/3 and passes SIGTERM/SIGUSR1 on.

Real torchrun (torch.distributed.run), two gloo workers, the tiny model on a slice of the KJV
corpus. Plain ``torchrun -m megatron_grow train`` turns each of these into exit 1 (bad input:
``ChildFailedError``; SIGUSR1: torchrun dies with the workers orphaned; SIGTERM: exit 1).

* bad input: exit 2, one ``megatron-grow: error:`` line, no traceback, no ChildFailedError;
* SIGTERM / SIGUSR1 sent to the launcher once training runs: the workers save, exit 3;
* a worker killed unsaved after SIGTERM while its peer waits for it: the launcher stops the peer
  within seconds (exit 143) instead of sitting out torchrun's shutdown timeout;
* a signal during start-up (seeded delays spread over the time to the first step): exit 3 with
  a checkpoint, or, before any worker got going, 128 + signal; never a traceback (slow: four
  runs of about a minute each on 2 cores).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from megatron_grow.checkpoint import io, paths
from tests.distributed.conftest import REPO, write_recipe

TIMEOUT = 400


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    return env


def _launch(args: list[str], log: str) -> subprocess.Popen:
    out = open(log, "w", encoding="utf-8")  # noqa: SIM115 (closed by _finish)
    return subprocess.Popen([sys.executable, "-m", "megatron_grow", "launch", "--standalone", "--nproc-per-node",
                             "2", *args], cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, log: str) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left of the session (there should be nothing)
        except ProcessLookupError:
            pass
    with open(log, encoding="utf-8") as f:
        return rc, f.read()


def _wait_for(log: str, needle: str, proc: subprocess.Popen) -> float:
    start = time.monotonic()
    while time.monotonic() - start < TIMEOUT:
        with open(log, encoding="utf-8") as f:
            if needle in f.read():
                return time.monotonic() - start
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    with open(log, encoding="utf-8") as f:
        pytest.fail(f"never saw {needle!r}; rc={proc.poll()}\n{f.read()[-3000:]}")


def _long_recipe(tmp_path, kjv_dataset, name="r.yaml"):
    return write_recipe(tmp_path / name, kjv_dataset, tmp_path / "run",
                        training={"train_iters": 100000}, checkpoint={"save_interval": 100000})


def test_bad_input_exits_2_with_one_line(kjv_dataset, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", kjv_dataset, tmp_path / "run",
                          data={"data_path": [str(tmp_path / "no_such_prefix")]})
    log = str(tmp_path / "log")
    rc, out = _finish(_launch(["train", "--config", recipe], log), log)
    assert rc == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("megatron-grow: error:")]
    assert len(errors) == 1 and "no_such_prefix" in errors[0], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_launcher_saves_and_exits_3(kjv_dataset, tmp_path, sig):
    log = str(tmp_path / "log")
    proc = _launch(["train", "--config", _long_recipe(tmp_path, kjv_dataset)], log)
    _wait_for(log, "iter       2", proc)
    proc.send_signal(sig)
    rc, out = _finish(proc, log)
    assert rc == 3, out[-3000:]
    iteration = paths.read_tracker(str(tmp_path / "run"))
    assert iteration >= 2, out[-3000:]
    io.check_shard_files(paths.iteration_dir(str(tmp_path / "run"), iteration))
    assert "exiting with code 3" in out and "Traceback" not in out, out[-3000:]


def _catches_sigterm(process) -> bool:
    """The worker has installed its SIGTERM handler (Linux: the SigCgt mask in /proc/PID/status)."""
    try:
        with open(f"/proc/{process.pid}/status", encoding="ascii") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def test_worker_dead_before_saving_does_not_hold_the_launcher(kjv_dataset, tmp_path):
    """The case behind a 400 s hang in CI: SIGTERM reached one worker before its handler existed
    (it died) and the other remembered it, then waited in start-up for the dead rank. Here rank 0
    is killed right after the launcher forwarded SIGTERM. torchrun alone would wait out its
    shutdown timeout (600 s); the launcher stops the stranded worker within seconds."""
    import psutil

    log = str(tmp_path / "log")
    proc = _launch(["train", "--config", _long_recipe(tmp_path, kjv_dataset)], log)
    launcher = psutil.Process(proc.pid)
    deadline = time.monotonic() + TIMEOUT
    while not (len(launcher.children()) == 2 and all(map(_catches_sigterm, launcher.children()))):
        assert time.monotonic() < deadline and proc.poll() is None, open(log).read()[-3000:]
        time.sleep(0.05)
    rank0 = next(w for w in launcher.children() if w.environ().get("RANK") == "0")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # torchrun has forwarded it: both workers remembered it
    rank0.kill()
    rc, out = _finish(proc, log)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "a worker ended without saving" in out and "Traceback" not in out, out[-3000:]
    assert not os.path.exists(os.path.join(tmp_path, "run", paths.TRACKER_FILENAME)), out[-3000:]


@pytest.mark.slow
def test_signal_during_start_up_never_gives_a_traceback(kjv_dataset, tmp_path):
    seed = 20261129
    rng = random.Random(seed)
    log0 = str(tmp_path / "log0")
    proc = _launch(["train", "--config", _long_recipe(tmp_path, kjv_dataset, "r0.yaml")], log0)
    to_first_step = _wait_for(log0, "iter       1", proc)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc, log0)[0] == 3
    n = 3
    outcomes = []
    for i in range(n):
        # Stratified over the start-up from 1 s on: before that the interpreter itself is starting and
        # no process can handle a signal yet (the default action ends it, with nothing started).
        delay = 1.0 + (i + rng.random()) * (to_first_step - 1.0) / n
        run_dir = tmp_path / f"run{i}"
        recipe = write_recipe(tmp_path / f"r{i + 1}.yaml", kjv_dataset, run_dir,
                              training={"train_iters": 100000}, checkpoint={"save_interval": 100000})
        log = str(tmp_path / f"log{i + 1}")
        proc = _launch(["train", "--config", recipe], log)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        rc, out = _finish(proc, log)
        context = f"seed {seed}, run {i}, SIGTERM {delay:.2f}s after start (first step at {to_first_step:.2f}s)"
        outcomes.append((round(delay, 2), rc))
        assert "Traceback" not in out, f"{context}\n{out[-3000:]}"
        assert rc in (3, 128 + signal.SIGTERM), f"{context}: rc {rc}\n{out[-3000:]}"
        if rc == 3:
            iteration = paths.read_tracker(str(run_dir))
            io.check_shard_files(paths.iteration_dir(str(run_dir), iteration))
    print(f"seed {seed}: (delay s, exit code) {outcomes}")
