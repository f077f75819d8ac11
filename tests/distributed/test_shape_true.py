"""A shape-true run on real data: the paper's proportions at a shrunk width, 8 gloo ranks, grown then trained on.

The model keeps the paper's ratios (configs/models/_paper_base.yaml, 17b.yaml): 16 heads in 4 KV
groups, 96 experts with top-6 routing, SwiGLU experts, sigmoid router with expert bias; only the
sizes shrink (hidden 2048 -> 64, head dim 128 -> 4, expert FFN 1024 -> 32, 28 -> 4 layers, a
512-token vocabulary). It is trained 2 steps on the KJV corpus on TP 2 x PP 2 x EP 2 (8 ranks),
grown offline depth x2 (interposition) then width x2 (192 experts, top-12, gaussian noise
alpha 0.01) into a *different* 8-rank layout (PP 2 x EP 4) and into 1 rank; then each grown
checkpoint is trained on for 2 steps in its own layout.

* The two grown checkpoints are bit-identical, tensor by tensor (noise is keyed by global layer
  and expert, never by rank).
* Training on continues from the source's iteration, with finite losses; the 8-rank and 1-rank
  losses agree to 1e-3 relative (the same weights and data; the layouts sum in different orders).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_shape_true.py
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import grow_body, plain_tensors_of_many, train_body
from tests.distributed.conftest import write_recipe

pytestmark = pytest.mark.slow  # several minutes on 2 shared cores: 8-rank training, two grows, two trainings

SHAPE = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 16, "num_query_groups": 4, "kv_channels": 4,
         "num_moe_experts": 96, "moe_router_topk": 6, "moe_ffn_hidden_size": 32, "vocab_size": 512,
         "seq_length": 32}
SOURCE_LAYOUT = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                 "expert_model_parallel_size": 2}
TARGET_LAYOUT = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2,
                 "expert_model_parallel_size": 4}
GROWTH = ("growth:\n  order: [depth, width]\n  depth: {mode: interposition, factor: 2}\n"
          "  width: {factor: 2, noise: gaussian, alpha: 0.01}\n")


def train_grown(recipe_path: str) -> dict:
    """Train on from the grown checkpoint in ``checkpoint.load``, composed as ``megatron-grow train`` does
    for a growth recipe that resumes (cli/train.py: the grown checkpoint's architecture)."""
    from megatron_grow.growth.grown_model import grown_model_of
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path)
    run = Trainer(recipe, model=grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth)).run()
    return {"exit_code": run.exit_code, "train_losses": run.train_losses}


def recipe(tmp_path, name: str, dataset, run_dir, parallel: dict, iters: int, growth: bool = False) -> str:
    path = write_recipe(tmp_path / f"{name}.yaml", dataset, run_dir, model=SHAPE, parallel=parallel,
                        training={"train_iters": iters, "micro_batch_size": 1, "global_batch_size": 8},
                        checkpoint={"save_interval": 2})
    if growth:
        with open(path, "a") as f:
            f.write(GROWTH)
    return path


def test_paper_shaped_growth_on_8_ranks_equals_1_rank_and_trains_on(kjv_dataset, tmp_path):
    source = tmp_path / "source"
    run_in_processes(train_body, 8, (recipe(tmp_path, "source", kjv_dataset, source, SOURCE_LAYOUT, 2), []),
                     timeout=900)
    growth = load_recipe(recipe(tmp_path, "g", kjv_dataset, tmp_path / "x", {}, 4, growth=True)).growth
    grown = {"8": tmp_path / "grown8", "1": tmp_path / "grown1"}
    run_in_processes(grow_body, 8, (str(source), str(grown["8"]), growth, ParallelConfig(**TARGET_LAYOUT)),
                     timeout=900)
    run_in_processes(grow_body, 1, (str(source), str(grown["1"]), growth, ParallelConfig()), timeout=900)
    t8, t1 = run_in_processes(plain_tensors_of_many, 1, ([str(grown["8"]), str(grown["1"])],), timeout=900)[0]
    assert sorted(t8) == sorted(t1)
    assert t8["decoder.layers.mlp.router.weight"].shape[:2] == (8, 192)  # 8 layers, 192 experts
    differ = [k for k in t1 if t8[k].dtype != t1[k].dtype or not torch.equal(t8[k], t1[k])]
    assert not differ, f"grown into 8 ranks differs from grown into 1 rank: {differ}"

    on8 = run_in_processes(train_grown, 8, (recipe(tmp_path, "on8", kjv_dataset, grown["8"], TARGET_LAYOUT, 4,
                                                  growth=True),), timeout=900)
    on1 = run_in_processes(train_grown, 1, (recipe(tmp_path, "on1", kjv_dataset, grown["1"], {}, 4, growth=True),),
                           timeout=900)
    losses8 = [loss for r in on8 for it, loss in r["train_losses"] if loss is not None][:2]
    losses1 = [loss for it, loss in on1[0]["train_losses"]]
    assert [it for it, _ in on1[0]["train_losses"]] == [3, 4]  # continues from the source's iteration 2
    assert all(math.isfinite(x) for x in losses1 + losses8)
    assert losses8 == pytest.approx(losses1, rel=1e-3)
