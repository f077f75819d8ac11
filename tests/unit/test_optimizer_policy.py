"""``growth.optimizer: policy``: the recipe section's one-line errors naming the key, and the rule lookup
(a kind's own rule, else the policy's default for originals / copies)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import MomentPolicy, OptimizerPolicyConfig
from megatron_grow.errors import ConfigError

WIDTH = {"width": {"factor": 2}}


@pytest.mark.parametrize("growth,line", [
    ({"optimizer": "policy"}, "growth.optimizer: policy needs a growth.optimizer_policy section"),
    ({"optimizer_policy": {}}, "growth.optimizer_policy is set but growth.optimizer is 'reset'"),
    ({"optimizer": "policy", "optimizer_policy": {"router": {"copies": {"exp_avg": "zero"}}}},
     "growth.optimizer_policy.router.copies.exp_avg: 'zero' is not allowed"),
    ({"optimizer": "policy", "optimizer_policy": {"copies": {"exp_avg_sq_factor": -1}}},
     "growth.optimizer_policy.copies.exp_avg_sq_factor: -1.0 is not allowed; must be >= 0.0"),
    ({"optimizer": "policy", "optimizer_policy": {"copies": {"exp_avg_sq_toward": -1e-3}}},
     "growth.optimizer_policy.copies.exp_avg_sq_toward: -0.001 is not allowed; must be >= 0.0"),
    ({"optimizer": "policy", "optimizer_policy": {"expert": {}}}, "growth.optimizer_policy.expert"),
])
def test_bad_policy_is_one_line_naming_the_key(growth, line):
    with pytest.raises(ConfigError) as err:
        load_recipe(raw={"growth": {**WIDTH, **growth}})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(line), err.value.problems


def test_rule_lookup_and_record_round_trip():
    policy = load_recipe(raw={"growth": {**WIDTH, "optimizer": "policy", "optimizer_policy": {
        "copies": {"exp_avg": "reset"}, "experts": {"copies": {"exp_avg": "scale", "exp_avg_factor": 0.5}}}}}
    ).growth.optimizer_policy
    assert policy.policy_for("experts", True).rule("exp_avg") == ("scale", 0.5, 0.0)
    assert policy.policy_for("experts", False) == MomentPolicy()          # no experts.originals: the default
    assert policy.policy_for("router", True).rule("exp_avg") == ("reset", 1.0, 0.0)
    assert policy.policy_for(None, True).rule("exp_avg_sq") == ("copy", 1.0, 0.0)
    assert OptimizerPolicyConfig.from_record(dataclasses.asdict(policy)) == policy
