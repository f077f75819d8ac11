"""``megatron-grow weight-norms`` as a script: ``python tools/weight_norms.py ARGS``.

See megatron_grow/cli/weight_norms.py for the options.
"""

from __future__ import annotations

import sys

from megatron_grow.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["weight-norms", *sys.argv[1:]]))
