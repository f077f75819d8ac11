"""What a validated growth reads from: the source checkpoint, its architecture and the plan.

Its own module so that both the weights' loader (``growth.grow``) and the optimizer carry
(``growth.optimizer_state``) can name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_grow.checkpoint import keys
from megatron_grow.checkpoint.manifest import CheckpointInfo
from megatron_grow.checkpoint.reader import CheckpointReader
from megatron_grow.growth.plan import GrowthPlan


@dataclass
class GrowthSource:
    """A validated growth: the source checkpoint, its architecture and the plan (``grow.prepare_growth``)."""

    root: str
    info: CheckpointInfo
    plan: GrowthPlan
    source_spec: str = keys.LOCAL_SPEC   # which layer spec's names SRC is stored under
    storage: Any = None                  # SRC's torch DCP metadata, read (and checked) once
    _reader: CheckpointReader | None = field(default=None, repr=False)

    @property
    def ckpt_dir(self) -> str:
        """The source's iteration directory."""
        return self.info.ckpt_dir

    @property
    def reader(self) -> CheckpointReader:
        """Region reads of SRC on this rank (no collectives), sharing the metadata read once."""
        if self._reader is None:
            self._reader = CheckpointReader(self.ckpt_dir, storage_metadata=self.storage)
        return self._reader
