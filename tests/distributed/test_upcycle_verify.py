"""Expert upcycling through the real grow and ``verify``: where the function is preserved and by how much not.

A tiny MoE (sigmoid routing with expert bias, 4 experts, top-2) is saved, upcycled to 6 experts (top-2
kept) into EP=2, and verified against its source in EP=2 on the probe batch:

* exact copies (no bias perturbation): a copy ties with its original, so tokens that chose the
  original now spend a second slot on its copy: the selected set of source experts changes for a
  share of tokens and the function moves (KL > 0). ``verify`` reports both.
* ``unselected_copies``: by definition (docs/growth.md) a copy's score plus bias stays below every
  original's, so no token selects a copy: the selected sets, the routing shares and the logits are
  the source's.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/distributed/test_upcycle_verify.py
"""

from __future__ import annotations

import pytest

from megatron_grow.config.schema import GrowthConfig, ParallelConfig, UpcycleGrowthConfig
from megatron_grow.parallel.spawn import run_in_processes
from tests.distributed.bodies import build_save_forward, grow_body, tiny_model

pytestmark = pytest.mark.slow  # ~1 min on 2 shared cores: one save, two growths, two verifies

MODEL = tiny_model(moe_router_enable_expert_bias=True)
EP2 = ParallelConfig(expert_model_parallel_size=2)


def _grow_and_verify(root: str, grown: str, unselected: bool) -> dict:
    from megatron_grow.growth.verify import verify_growth

    # each of the 4 layers its own copies (e1 e2 / e0 e3 / e2 e3 / e0 e1): verify must read each layer's map
    shares = ((0.1, 0.5, 0.3, 0.1), (0.5, 0.1, 0.1, 0.3), (0.1, 0.1, 0.4, 0.4), (0.4, 0.4, 0.1, 0.1))
    growth = GrowthConfig(upcycle=UpcycleGrowthConfig(num_experts=6, utility_shares=shares,
                                                      unselected_copies=unselected))
    run_in_processes(grow_body, 2, (root, grown, growth, EP2))
    return run_in_processes(verify_growth, 2, (root, grown, EP2))[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("upcycle_src") / "ckpt")
    run_in_processes(build_save_forward, 1, (MODEL, ParallelConfig(), root))
    return root


def test_exact_copies_change_the_topk_and_verify_says_how_much(source, tmp_path):
    m = _grow_and_verify(source, str(tmp_path / "grown"), unselected=False)
    assert 0 < m["topk_set_changed"] <= 1
    assert m["kl_mean"] > 0 and m["routing_share_copies"] > 0
    assert len(m["routing_share_by_source_expert_after"]) == 4


def test_unselected_copies_preserve_the_function(source, tmp_path):
    m = _grow_and_verify(source, str(tmp_path / "grown"), unselected=True)
    assert m["topk_set_changed"] == 0 and m["routing_share_copies"] == 0 and m["routing_mass_moved"] == 0
    assert m["routing_share_by_source_expert_before"] == m["routing_share_by_source_expert_after"]
    assert m["kl_mean"] < 1e-12 and m["max_abs_logit_diff"] < 1e-5
