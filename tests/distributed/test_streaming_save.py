"""``checkpoint.streaming``: tensors produced while they are written, saved atomically.

On 2 gloo ranks, a sharded state dict of meta-device ShardedTensors (a stacked ``[4, 6, 5]``
tensor split over the ranks along its first axis, and a replicated ``[3]`` tensor) is saved
through ``io.save_checkpoint(..., produce=...)``:

* the values read back by Megatron-Core's ``load_plain_tensors`` are the formula's, and the
  common state survives;
* a producer that fails on one tensor, on one rank, fails the save on every rank and leaves no
  iteration directory and no staging directory behind (the earlier checkpoint stays current).
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_grow.parallel.spawn import run_in_processes


def expected_stacked() -> torch.Tensor:
    return torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5) / 7


def expected_norm() -> torch.Tensor:
    return torch.tensor([1.5, -2.0, 0.25])


def lazy_state() -> dict:
    """This rank's meta ShardedTensors: layers [2r, 2r+2) of the stacked tensor, the norm on every
    rank (rank 0's copy is the main replica)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    r = torch.distributed.get_rank()
    layers = [ShardedTensor.from_rank_offsets("stacked.weight", torch.empty(6, 5, device="meta"),
                                              (0, 2 * r + i, 4), replica_id=0, prepend_axis_num=1)
              for i in range(2)]
    norm = ShardedTensor.from_rank_offsets("norm.weight", torch.empty(3, device="meta"), replica_id=r)
    return {"model": {"layers": layers, "norm": norm}, "iteration": 7}


def values_of(st) -> torch.Tensor:
    if st.key == "norm.weight":
        return expected_norm()
    return expected_stacked()[st.global_offset[0]]


def save_body(root: str, fail_on_layer: int | None) -> str:
    from megatron_grow.checkpoint import io
    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())

    def produce(st):
        if fail_on_layer is not None and st.key == "stacked.weight" and st.global_offset[0] == fail_on_layer:
            raise RuntimeError(f"producer failed on purpose at layer {fail_on_layer}")
        return values_of(st)

    try:
        io.save_checkpoint(root, 1, lazy_state(), {"note": "streaming test"}, produce=produce)
    except BaseException as e:  # noqa: BLE001 - the message is what the test checks
        return f"failed: {e}"
    return "saved"


def read_body(ckpt_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())
    tensors = dist_checkpointing.load_plain_tensors(ckpt_dir)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    return {"tensors": {k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)},
            "iteration": common.get("iteration")}


def test_streamed_values_are_saved(tmp_path):
    root = str(tmp_path / "run")
    assert run_in_processes(save_body, 2, (root, None)) == ["saved", "saved"]
    ckpt = os.path.join(root, "iter_0000001")
    assert sorted(os.listdir(root)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    got = run_in_processes(read_body, 1, (ckpt,))[0]
    assert torch.equal(got["tensors"]["stacked.weight"], expected_stacked())
    assert torch.equal(got["tensors"]["norm.weight"], expected_norm())
    assert got["iteration"] == 7
    assert os.path.isfile(os.path.join(ckpt, "metadata.json"))


@pytest.mark.parametrize("fail_on_layer", [0, 3])  # a layer of rank 0, then one of rank 1
def test_a_failing_producer_fails_the_save_everywhere(tmp_path, fail_on_layer):
    root = str(tmp_path / "run")
    results = run_in_processes(save_body, 2, (root, fail_on_layer))
    assert all(r.startswith("failed") for r in results), results
    owner = fail_on_layer // 2
    assert f"failed on purpose at layer {fail_on_layer}" in results[owner], results[owner]
    leftovers = os.listdir(root) if os.path.isdir(root) else []
    assert leftovers == [], leftovers
