"""Turn bad input into one readable line and exit code 2, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from megatron_grow.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_VERIFY_FAILED, UserInputError, VerificationError

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERROR_TYPES = (UserInputError, FileNotFoundError)


def run_with_clean_errors(fn: Callable, args) -> int:
    try:
        return int(fn(args) or 0)
    except USER_ERROR_TYPES as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
            print(f"megatron-grow: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VerificationError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-grow: {e}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    except KeyboardInterrupt:
        # Ctrl-C: every writer has already removed its partial output on the way out (staging
        # directories, *.tmp files), and nothing replaced an existing destination.
        if os.environ.get("RANK", "0") == "0":
            print("megatron-grow: interrupted (SIGINT); the output being written was discarded, "
                  "existing checkpoints and files are unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
