"""``megatron-grow advise`` as a script: ``python tools/advise_growth.py ARGS``.

See megatron_grow/cli/advise.py for the options.
"""

from __future__ import annotations

import sys

from megatron_grow.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["advise", *sys.argv[1:]]))
