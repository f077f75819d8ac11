"""docker/Dockerfile copies every folder the image's users run from (a text check: no Docker here)."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_image_holds_what_its_commands_need():
    text = (REPO / "docker" / "Dockerfile").read_text()
    copied = {m.group(1).rstrip("/") for m in re.finditer(r"^COPY\s+(\S+)\s+\S+\s*$", text, flags=re.MULTILINE)}
    # megatron_grow: the package; configs: recipes; scripts: check.sh and launchers; data: the shipped
    # corpus; benchmarks: gpu_bench.py; tests: the GPU tier.
    needed = {"megatron_grow", "configs", "scripts", "data", "benchmarks", "tests"}
    assert needed <= copied, f"missing from the image: {sorted(needed - copied)}"
    for folder in needed:
        assert (REPO / folder).is_dir(), folder
