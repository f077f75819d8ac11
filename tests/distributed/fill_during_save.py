"""Run the ``megatron-grow`` CLI with the disk filled by "another writer" right after the save's
free-space check, so that the disk fills while torch's writer threads write.

    python -m tests.distributed.fill_during_save FILLER -- grow --load SRC --save DST ...

``FILLER`` (a file on the same small disk) is written to leave 64 KiB free, once the staging
directory exists: the same moment a concurrent writer could take the space.
"""

from __future__ import annotations

import os
import sys
from unittest import mock


def main() -> int:
    filler, argv = sys.argv[1], sys.argv[3:]
    from megatron_grow.__main__ import main as cli_main
    from megatron_grow.checkpoint import io

    prepare = io._prepare_save_dir

    def prepare_then_fill(root, staging, needed):
        prepare(root, staging, needed)
        st = os.statvfs(os.path.dirname(filler))
        with open(filler, "wb") as f:
            f.write(b"\0" * max(st.f_bavail * st.f_frsize - 65536, 0))

    with mock.patch.object(io, "_prepare_save_dir", prepare_then_fill):
        return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
