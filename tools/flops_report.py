"""``megatron-grow flops`` as a script: ``python tools/flops_report.py ARGS``.

See megatron_grow/cli/flops.py for the options.
"""

from __future__ import annotations

import sys

from megatron_grow.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["flops", *sys.argv[1:]]))
