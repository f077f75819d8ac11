"""Turn expected user errors into one readable line and a non-zero exit, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERROR_EXIT = 2


def user_error_types() -> tuple[type, ...]:
    from megatron_grow.config.loader import ConfigError
    from megatron_grow.errors import MegatronGrowError
    from megatron_grow.parallel.init import LayoutError

    return (ConfigError, LayoutError, MegatronGrowError, FileNotFoundError)


def run_with_clean_errors(fn: Callable, args) -> int:
    try:
        return int(fn(args) or 0)
    except user_error_types() as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
            print(f"megatron-grow: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
