"""Session set-up shared by every test: CPU mode is installed here, as at every entry point."""

from __future__ import annotations

import pytest
import torch

from megatron_grow.errors import EXIT_BAD_INPUT
from megatron_grow.platform import cpu


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true",
                     help="the GPU tier was asked for: without CUDA, stop at once with exit code 2 "
                          "instead of skipping every GPU test and reporting success")


def pytest_configure(config):
    if config.getoption("--require-gpu") and not torch.cuda.is_available():
        # Before anything is collected: the only line printed is this one.
        pytest.exit("--require-gpu: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                    "the GPU tier did not run", returncode=EXIT_BAD_INPUT)
    # A no-op with CUDA; on CPU the tests run MCore the way `megatron-grow` does after its main().
    cpu.apply_cpu_adaptations()


# Everything that starts processes or trains lives in these folders: slow by definition, so the
# inner loop (`pytest -m "not slow"`) needs no per-test bookkeeping there. Slow tests elsewhere
# carry @pytest.mark.slow themselves.
SLOW_FOLDERS = ("distributed", "functional", "launch")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        if "tests" in parts and parts[parts.index("tests") + 1] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
