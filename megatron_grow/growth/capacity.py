"""Refuse a growth this machine cannot hold, with the numbers, before anything is built.

A growth factor has no natural upper bound in the recipe, but the grown model has a size: its
parameter count (``models.params.count_params``, the analytic count the plan prints) times the
bytes per stored element is what ``grow`` writes to ``--save`` (a lower bound: the manifest,
``common.pt`` and any carried optimizer state come on top). The built-in verify then holds the
source and the grown model in memory at once (weights only, in the source's stored dtype, on
CPU). A factor of 100,000,000 used to run for minutes without a word while it built index maps
and modules for a model no disk could hold; now it is one line naming the size and the space.

``capacity_problem`` is pure arithmetic (tested with made-up machine sizes); ``machine_free_bytes``
reads the machine (free disk at the nearest existing folder of ``--save``, ``MemAvailable``).
"""

from __future__ import annotations

import math
import os
import shutil

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_grow.checkpoint import io
from megatron_grow.config.growth_rules import grown_model
from megatron_grow.config.schema import GrowthConfig, ModelConfig
from megatron_grow.errors import GrowthError
from megatron_grow.models.params import count_params

GB = 1e9
CPU_BYTES_PER_PARAM = 4  # fp32: the dtype every CPU run builds its model in (schema: training.bf16)


def growth_words(growth: GrowthConfig) -> str:
    """``growth.depth.factor=2, growth.width.factor=4``: the keys that set the size."""
    parts = [f"growth.{name}.factor={getattr(growth, name).factor}" for name in ("depth", "width")
             if getattr(growth, name) is not None]
    return ", ".join(parts)


def capacity_problem(source: ModelConfig, growth: GrowthConfig, bytes_per_param: int, save: str,
                     free_disk: int, free_memory: int | None, with_verify: bool) -> str | None:
    """Why the model ``growth`` makes of ``source`` cannot be written to ``save`` (``free_disk``
    bytes free, ``bytes_per_param`` as stored) or, ``with_verify``, held next to the source in
    ``free_memory`` bytes (fp32: CPU runs always compute in fp32; None: not checked); None when
    it fits, else one sentence with the sizes."""
    grown = grown_model(source, growth)
    source_params, grown_params = count_params(source).total, count_params(grown).total
    grown_bytes = grown_params * bytes_per_param
    size = (f"{growth_words(growth)} grows {source_params:,} parameters ({source.num_layers} layers x "
            f"{source.num_moe_experts} experts) to {grown_params:.3g} ({grown.num_layers:,} layers x "
            f"{grown.num_moe_experts:,} experts)")
    problems = []
    if grown_bytes > free_disk:
        problems.append(f"no space left on device for the grown checkpoint: it needs at least {_size(grown_bytes)} "
                        f"({bytes_per_param} bytes per parameter), {_size(free_disk)} are free at {save}")
    resident = (source_params + grown_params) * CPU_BYTES_PER_PARAM
    if with_verify and free_memory is not None and resident > free_memory:
        problems.append(f"verify holds source and grown model in memory, at least {_size(resident)}, "
                        f"{_size(free_memory)} are available (--no-verify skips it)")
    return f"{size}: {'; '.join(problems)}" if problems else None


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:,.1f} GB" if nbytes >= GB else f"{nbytes / 2**20:,.1f} MiB"


def check_capacity(source: ModelConfig, growth: GrowthConfig, ckpt_dir: str, save: str, with_verify: bool,
                   dtype: str = "auto") -> None:
    """A GrowthError with :func:`capacity_problem` of this machine; bytes per parameter are those
    of SRC's largest stored tensor (``grow --dtype auto`` keeps the source's dtype), else ``dtype``'s."""
    md = io.read_storage_metadata(ckpt_dir)
    tensors = [m for m in md.state_dict_metadata.values() if isinstance(m, TensorStorageMetadata)]
    largest = max(tensors, key=lambda m: math.prod(m.size)) if tensors else None
    bytes_per_param = torch.empty((), dtype=largest.properties.dtype).element_size() if largest else 2
    bytes_per_param = {"fp32": 4, "bf16": 2}.get(dtype, bytes_per_param)
    free_disk, free_memory = machine_free_bytes(save)
    on_cpu = not torch.cuda.is_available()  # on a GPU, verify holds the models in GPU memory instead
    problem = capacity_problem(source, growth, bytes_per_param, save, free_disk,
                               free_memory if on_cpu else None, with_verify)
    if problem:
        raise GrowthError(problem)


def machine_free_bytes(save: str) -> tuple[int, int | None]:
    """(free disk bytes where ``save`` will be written, available memory bytes or None if unknown)."""
    folder = os.path.abspath(save)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free, _available_memory()


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
