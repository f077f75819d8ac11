"""What growth hands to training: where the grown model starts.

Growth (``growth.grow.grow_load_into``) fills the grown model's weights and returns a
:class:`GrownStart`; the command that composes the two (``cli/train.py``, ``--grow-from``) may add
the optimizer loader (``growth.optimizer: carry``); the trainer
(``training.trainer.Trainer``) starts from it. It lives in ``checkpoint/`` because growth and
training may both import this layer but never each other, and because what it carries is what
the grown model's first checkpoint records (counters and lineage, ``checkpoint.manifest``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# (optimizer, model chunks) -> None: fills a live optimizer's state for the grown model.
OptimizerLoader = Callable[[Any, Any], None]


@dataclass(frozen=True)
class GrownStart:
    """The start of a run on a freshly grown model.

    Attributes:
        counters: the counters the run continues from (iteration, consumed samples and tokens,
            FLOPs so far, all of it sunk: ``sunk_flops``), as ``checkpoint.manifest`` names them.
        lineage: the source's growth records plus this growth's, oldest first.
        load_optimizer: with ``growth.optimizer: carry``, fills the trainer's optimizer from the
            source's Adam state grown like the weights; None starts fresh Adam moments.
    """

    counters: Mapping[str, Any] = field(default_factory=dict)
    lineage: tuple[dict, ...] = ()
    load_optimizer: OptimizerLoader | None = None

    def with_optimizer_loader(self, load_optimizer: OptimizerLoader) -> GrownStart:
        """This start, with ``load_optimizer`` filling the optimizer.

        Args:
            load_optimizer: called as ``load_optimizer(optimizer, model_chunks)`` once the weights are in.

        Returns:
            A new ``GrownStart``.
        """
        return dataclasses.replace(self, load_optimizer=load_optimizer)
