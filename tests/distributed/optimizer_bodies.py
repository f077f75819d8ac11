"""Bodies for tests/distributed/test_optimizer_state.py (run inside gloo processes)."""

from __future__ import annotations

from megatron_grow.checkpoint import paths
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.config.loader import load_recipe
from megatron_grow.models.routing import unwrap
from megatron_grow.training.checkpointing import load_training_checkpoint, save_training_checkpoint
from megatron_grow.training.optimizer import build_scheduler
from megatron_grow.training.trainer import Trainer
from tests.distributed.bodies import train_body


def _recorded_model(recipe):
    ckpt, it = paths.resolve_checkpoint_dir(recipe.checkpoint.load)
    return read_checkpoint_info(ckpt, it).model or recipe.model


def _loaded_trainer(recipe):
    """A built trainer with ``checkpoint.load`` loaded (weights, optimizer, scheduler, RNG) in this
    run's layout: (trainer, scheduler, counters, lineage)."""
    trainer = Trainer(recipe, model=_recorded_model(recipe))
    trainer.build()
    scheduler = build_scheduler(trainer.optimizer, recipe, recipe.training.train_iters)
    counters, lineage, _, _ = load_training_checkpoint(recipe.checkpoint.load, trainer.chunks, trainer.optimizer,
                                                       scheduler)
    return trainer, scheduler, counters, lineage


def resave_body(recipe_path: str, overrides: list) -> str:
    """Load ``checkpoint.load`` in this run's layout (weights, optimizer, scheduler, RNG) and save it
    unchanged to ``checkpoint.save``: the same training state, written by this layout."""
    recipe = load_recipe(recipe_path, overrides)
    trainer, scheduler, counters, lineage = _loaded_trainer(recipe)
    return save_training_checkpoint(recipe.checkpoint.save, trainer.chunks, trainer.optimizer, scheduler, recipe,
                                    trainer.model_cfg, counters, lineage, trainer.ctx.layout.as_record())


def resave_and_resume(resave: tuple, resumes: list) -> list:
    """``resave_body(*resave)`` then ``train_body`` for each (recipe, overrides) in the same processes."""
    resave_body(*resave)
    return [train_body(recipe, overrides) for recipe, overrides in resumes]


def one_step(recipe_path: str, overrides: list) -> dict:
    """Resume ``checkpoint.load`` in one process and take one training step on the next batch.

    Returns, per module state-dict key of every parameter: the value before, the gradient
    (DDP's main_grad, summed over the step's micro batches) and the value after the step; the
    Adam state before the step (by parameter key) and the loss.
    """
    recipe = load_recipe(recipe_path, overrides)
    trainer, _, counters, _ = _loaded_trainer(recipe)
    trainer.build_data()
    batches = trainer.train_batches(counters["consumed_samples"])
    micro = [next(batches) for _ in range(trainer.num_micro)]
    model = unwrap(trainer.chunks[0])
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    for c in trainer.chunks:
        c.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    loss = trainer._forward_backward(micro, forward_only=False)
    grads = {k: p.main_grad.detach().clone() for k, p in params.items()}
    trainer.optimizer.step()
    after = {k: p.detach().clone() for k, p in params.items()}
    return {"loss": loss, "before": before, "grad": grads, "after": after,
            "lr": trainer.optimizer.param_groups[0]["lr"]}


def factories_after_shape_check(root: str) -> tuple[int, int]:
    """Count the model's ShardedTensorFactory entries before and after ``io.check_against_checkpoint``.

    The distributed optimizer's model-space format finds each parameter's ShardedTensor by the
    parameter object; a check that applied the factories in place would break the optimizer's
    loading state dict (found as "Model param ... not in model_sharded_state_dict")."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from megatron_grow.checkpoint import io
    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())
    ckpt, it = paths.resolve_checkpoint_dir(root)
    chunks = build_model_chunks(read_checkpoint_info(ckpt, it).model, ParallelConfig())
    sd = io.model_sharded_state_dict(chunks)
    count = lambda: sum(isinstance(x, ShardedTensorFactory) for x in state_dict_leaves(sd))
    before = count()
    io.check_against_checkpoint(sd, ckpt)
    return before, count()


def state_dict_leaves(tree):
    """Every leaf of a nested dict/list state dict (sharded tensors, objects, factories, values)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from state_dict_leaves(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from state_dict_leaves(v)
    else:
        yield tree
