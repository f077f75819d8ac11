"""Forward logits and loss under TP/PP/EP equal the 1-process model with the same weights,
and a torch_dist checkpoint saved at one layout loads at another with identical logits."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward, first_result, load_forward, tiny_model

MODEL = tiny_model()
# fp32 on CPU; reductions are split differently across ranks, so allow a few ulps.
ATOL = 2e-5

LAYOUTS = {
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "pp2": (2, ParallelConfig(pipeline_model_parallel_size=2)),
    "ep2": (2, ParallelConfig(expert_model_parallel_size=2)),
    "tp2_ep2": (4, ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2)),
    "pp2_vpp2": (2, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ref") / "ckpt")
    ref = first_result(run_in_processes(build_save_forward, 1, (MODEL, ParallelConfig(), root)))
    return root, ref


@pytest.fixture(scope="module")
def tp2_resaved(tmp_path_factory):
    """Where the TP=2 run re-saves the weights it loaded (read back by the cross-layout test)."""
    return str(tmp_path_factory.mktemp("tp2") / "ckpt")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_logits_equal_serial(reference, tp2_resaved, name):
    root, ref = reference
    world, parallel = LAYOUTS[name]
    resave = tp2_resaved if name == "tp2" else None
    out = first_result(run_in_processes(load_forward, world, (MODEL, parallel, root, resave)))
    assert out["logits"].shape == ref["logits"].shape
    torch.testing.assert_close(out["logits"], ref["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["losses"], ref["losses"], atol=ATOL, rtol=0)


def test_save_at_one_layout_load_at_another(reference, tp2_resaved):
    """The TP=2 run re-saved the serial weights at TP=2; EP=2 and PP=2 load that checkpoint."""
    _, ref = reference
    if not os.path.exists(tp2_resaved):  # run alone (-k): make the TP=2 checkpoint first
        run_in_processes(load_forward, 2, (MODEL, LAYOUTS["tp2"][1], reference[0], tp2_resaved))
    tp_root = tp2_resaved
    for name in ("ep2", "pp2"):
        world, parallel = LAYOUTS[name]
        out = first_result(run_in_processes(load_forward, world, (MODEL, parallel, tp_root)))
        torch.testing.assert_close(out["logits"], ref["logits"], atol=ATOL, rtol=0)


def test_fresh_init_differs_from_reference(reference, tmp_path):
    """Guards the tests above: a model that is *not* loaded gives different logits."""
    _, ref = reference
    other = first_result(run_in_processes(build_save_forward, 1, (MODEL, ParallelConfig(), str(tmp_path / "x"), 7)))
    assert (other["logits"] - ref["logits"]).abs().max() > 1e-2
