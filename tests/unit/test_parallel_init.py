"""``parallel.init``: a process started alone (no torchrun) must not race other processes for a port."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The race, made certain: the port picked as free is already taken when the store would bind it.
LONE_PROCESS = """
import socket
from megatron_grow.platform import cpu
cpu.apply_cpu_adaptations()
import megatron_grow.parallel.init as init
from megatron_grow.config.schema import ParallelConfig
held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
init.free_port = lambda: held.getsockname()[1]
ctx = init.initialize_distributed(ParallelConfig())
print("world", ctx.world_size, "rank", ctx.rank)
"""


def _run_alone(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python started as a user would, alone: no rendezvous variables inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_lone_process_binds_no_rendezvous_port():
    run = _run_alone(LONE_PROCESS)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "world 1 rank 0" in run.stdout


# Initialising again in the same process (repro's workers run many runs each) must not keep the earlier
# Megatron-Core groups: each gloo group holds threads, and 1,700 of them slowed a whole machine.
REINIT = """
import os
from megatron_grow.platform import cpu
cpu.apply_cpu_adaptations()
from megatron_grow.parallel.init import initialize_distributed
from megatron_grow.config.schema import ParallelConfig
initialize_distributed(ParallelConfig())
first = len(os.listdir(f"/proc/{os.getpid()}/task"))
for _ in range(5):
    initialize_distributed(ParallelConfig())
print("threads", first, len(os.listdir(f"/proc/{os.getpid()}/task")))
"""


@pytest.mark.slow
def test_initialising_again_keeps_no_earlier_groups():
    run = _run_alone(REINIT)
    assert run.returncode == 0, run.stderr[-2000:]
    first, after = (int(x) for x in run.stdout.split("threads")[1].split())
    assert after == first, (first, after)   # before the fix: 65 -> 320
