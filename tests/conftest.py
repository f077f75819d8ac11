"""Session set-up shared by every test: CPU mode is installed here, as at every entry point."""

from __future__ import annotations

from megatron_grow.platform import cpu


def pytest_configure(config):
    # A no-op with CUDA; on CPU the tests run MCore the way `megatron-grow` does after its main().
    cpu.apply_cpu_adaptations()
