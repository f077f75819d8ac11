"""Processes forked by a megatron-grow process die with it.

Megatron-Core's checkpoint writer forks helper processes during a save (its async caller, then
one writer per bucket: ``dist_checkpointing.strategies.filesystem_async``), and a fork inherits
every open file, the dataset's memory maps included. When the parent is killed (SIGKILL, OOM
killer) in the middle of a save, such a helper waits for its parent for good: reparented to
PID 1, blocked on a futex, holding the dataset files.

:func:`forked_children_die_with_parent` registers an at-fork hook, so every process forked
from then on asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to be killed when its
parent dies. The kernel ties the signal to the forking *thread*: the writers fork from the main
thread, which lives as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_parent_at_fork: int | None = None
_installed = False


def die_with_parent(parent_pid: int) -> None:
    """In a child: be SIGKILLed when ``parent_pid`` dies (and go now if it already has)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died between the fork and the prctl
        os._exit(1)


def _remember_parent() -> None:
    global _parent_at_fork
    _parent_at_fork = os.getpid()


def _in_child() -> None:
    if _parent_at_fork is not None:
        die_with_parent(_parent_at_fork)


def forked_children_die_with_parent() -> None:
    """From now on, every process this one forks (and they fork) dies when its parent dies."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_remember_parent, after_in_child=_in_child)
    _installed = True
