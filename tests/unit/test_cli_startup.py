"""Every command answers ``--help`` and argument errors before torch and Megatron-Core load.

Importing them costs 5-10 s here; a user who mistypes a flag should not wait for that. Checked
by what is in ``sys.modules`` after one command's parser is built, in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_grow.__main__ import available_commands

HEAVY = ("torch", "megatron", "transformers", "lm_eval", "matplotlib", "scipy")

_PROBE = """
import json, sys
from megatron_grow.__main__ import build_parser
build_parser(sys.argv[1])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))))
"""


@pytest.mark.parametrize("command", sorted(available_commands()))
def test_building_the_parser_imports_no_heavy_library(command):
    out = subprocess.run([sys.executable, "-c", _PROBE, command, json.dumps(HEAVY)], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [], f"megatron-grow {command}'s parser"
