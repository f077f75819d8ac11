"""Session set-up shared by every test: CPU mode is installed here, as at every entry point."""

from __future__ import annotations

from megatron_grow.platform import cpu


def pytest_configure(config):
    # A no-op with CUDA; on CPU the tests run MCore the way `megatron-grow` does after its main().
    cpu.apply_cpu_adaptations()


# Everything that starts processes or trains lives in these folders: slow by definition, so the
# inner loop (`pytest -m "not slow"`) needs no per-test bookkeeping there. Slow tests elsewhere
# carry @pytest.mark.slow themselves.
SLOW_FOLDERS = ("distributed", "functional", "launch")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        parts = item.path.parts
        if "tests" in parts and parts[parts.index("tests") + 1] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
