"""Run the ``megatron-grow`` CLI and die (``os._exit(9)``, no cleanup) at the N-th filesystem-changing
call made while the grown checkpoint is being written and swapped in.

    python -m tests.distributed.crash_inject N grow --load SRC --save DST ...

Prints ``CALLS <n>`` to stderr when the command gets to the end without crashing, so a test can
try every call in turn.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from contextlib import ExitStack
from unittest import mock

MUTATING = [(os, "rename"), (os, "replace"), (os, "remove"), (shutil, "rmtree")]


def main() -> int:
    crash_at, argv = int(sys.argv[1]), sys.argv[2:]
    from megatron_grow.__main__ import main as cli_main
    from megatron_grow.checkpoint import io, paths

    state = {"armed": False, "calls": 0}
    main_pid = os.getpid()

    def counted(fn):
        def wrapper(*args, **kwargs):
            # Only this process's main thread: MCore's shard writers run in helper processes/threads.
            if state["armed"] and os.getpid() == main_pid and threading.current_thread() is threading.main_thread():
                state["calls"] += 1
                if state["calls"] == crash_at:
                    os._exit(9)
            return fn(*args, **kwargs)
        return wrapper

    real_replacing = io.save_checkpoint_replacing

    def armed(*args, **kwargs):
        state["armed"] = True
        try:
            return real_replacing(*args, **kwargs)
        finally:
            state["armed"] = False

    with ExitStack() as stack:
        for module, name in MUTATING:
            stack.enter_context(mock.patch.object(module, name, counted(getattr(module, name))))
        stack.enter_context(mock.patch.object(paths, "exchange_paths", counted(paths.exchange_paths)))
        stack.enter_context(mock.patch.object(io, "save_checkpoint_replacing", armed))
        code = cli_main(argv)
    print(f"CALLS {state['calls']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
