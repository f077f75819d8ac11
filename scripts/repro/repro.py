#!/usr/bin/env python
"""Small-scale reproduction of the paper's four findings; see megatron_grow/repro.py and docs/results.md.

    python scripts/repro/repro.py --tiny                  # CI scale, about two minutes on 2 CPU cores
    python scripts/repro/repro.py --size gpu              # one GPU
    python scripts/repro/repro.py [--workdir runs/repro] [--tiny] [--size gpu|cpu|auto] [--seed N]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_grow.repro import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
