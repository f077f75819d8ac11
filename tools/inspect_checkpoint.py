"""``megatron-grow inspect`` as a script: ``python tools/inspect_checkpoint.py ARGS``.

See megatron_grow/cli/inspect.py for the options.
"""

from __future__ import annotations

import sys

from megatron_grow.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
