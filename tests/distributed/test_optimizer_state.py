"""Optimizer state in model space, and growth.optimizer: carry (docs/growth.md, "Optimizer carry").

* Resume across layouts: a training checkpoint saved at layout A resumes at layout B bitwise
  equal to resuming at B from the same training state saved by B itself (losses and every stored
  tensor); the A -> B conversion of weights and Adam state is lossless.
* Carry: the grown checkpoint's Adam moments equal expectations written here by indexing the
  source's moments (the operators' definitions: target layer j reads j // 2, target expert e
  reads e % E), in three target layouts; with carry_zero_new the new entries are zero.
* A function-preserving width growth (antithetic noise, top-k doubled) takes a first step whose
  update on dense parameters equals the source optimizer's, and on each original expert equals
  AdamW's update from the carried moments with half the source's gradient (derivation in
  docs/growth.md).
* Online carry (train --grow-from) equals offline carry then resume, bitwise.
* Bad combinations: one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import yaml

from megatron_grow.checkpoint import keys, paths
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig
from megatron_grow.parallel.spawn import run_in_processes
from megatron_grow.training.checkpointing import _saved_param_groups
from tests.distributed.bodies import grow_body, plain_tensors_of_many, train_body, train_sequence
from tests.distributed.conftest import REPO, write_recipe
from tests.distributed.optimizer_bodies import factories_after_shape_check, one_step, resave_and_resume

pytestmark = pytest.mark.slow

MODEL = {"vocab_size": 512, "seq_length": 32, "moe_aux_loss_coeff": 0.0}
ADAM = ("exp_avg", "exp_avg_sq")
LAYOUTS = {
    "serial": (1, {}),
    "tp2": (2, {"tensor_model_parallel_size": 2}),
    "ep2": (2, {"expert_model_parallel_size": 2}),
    "pp2": (2, {"pipeline_model_parallel_size": 2}),
}


def _iter_dir(root, iteration=None):
    return paths.resolve_checkpoint_dir(str(root), iteration)[0]


@pytest.fixture(scope="module")
def source(kjv_dataset, tmp_path_factory):
    """A tiny MoE trained 3 steps (serial), saved with its Adam state; its plain tensors."""
    root = tmp_path_factory.mktemp("src")
    recipe = write_recipe(root / "r.yaml", kjv_dataset, root / "run", model=MODEL,
                          training={"train_iters": 3, "clip_grad": 0.0}, checkpoint={"save_interval": 3})
    run_in_processes(train_body, 1, (recipe, []))
    return {"root": str(root / "run"), "recipe": recipe}


def _growth(name: str, **changes):
    growth = load_recipe(os.path.join(REPO, "configs", "growth", name)).growth
    return dataclasses.replace(growth, **changes)


# ------------------------------------------------------------------------------------------------
# Resume across layouts


@pytest.mark.parametrize("a,b", [("serial", "tp2"), ("ep2", "pp2")])
def test_resume_at_another_layout_is_bitwise_equal_to_resuming_at_that_layout(kjv_dataset, tmp_path, a, b):
    world_a, par_a = LAYOUTS[a]
    world_b, par_b = LAYOUTS[b]
    train = {"train_iters": 6, "lr_warmup_iters": 2, "lr_decay_style": "cosine"}

    def recipe(name, load, save, parallel):
        return write_recipe(tmp_path / f"{name}.yaml", kjv_dataset, tmp_path / save, model=MODEL, parallel=parallel,
                            training=train, checkpoint={"load": str(tmp_path / load), "save": str(tmp_path / save),
                                                        "save_interval": 3})

    first = recipe("a", "a", "a", par_a)
    run_in_processes(train_sequence, world_a, ([(first, ["training.train_iters=3"])],))
    resave = recipe("b", "a", "b", par_b)               # A's state, saved by layout B (no step taken)
    from_a = recipe("x", "a", "x", par_b)               # resume A's checkpoint at layout B
    from_b = recipe("y", "b", "y", par_b)               # resume B's own checkpoint at layout B
    out = run_in_processes(resave_and_resume, world_b, ((resave, []), [(from_a, []), (from_b, [])]))[0]
    x, y = out
    assert [i for i, _ in x["train_losses"]] == [4, 5, 6]
    assert x["train_losses"] == y["train_losses"], f"{a}->{b}: {x['train_losses']} vs {y['train_losses']}"
    ta, tb, tx, ty = run_in_processes(plain_tensors_of_many, 1, ([str(tmp_path / d) for d in "abxy"],))[0]
    opt = [k for k in ta if keys.is_model_space_optimizer_key(k)]
    assert len(opt) >= 20, sorted(ta)
    for k, v in ta.items():  # the A -> B conversion is lossless: weights and Adam state
        assert torch.equal(v, tb[k]), k
    assert set(tx) == set(ty)
    for k in tx:
        assert torch.equal(tx[k], ty[k]), k


def test_shape_check_leaves_the_callers_factories_unapplied(source):
    before, after = run_in_processes(factories_after_shape_check, 1, (source["root"],))[0]
    assert before > 0 and after == before


# ------------------------------------------------------------------------------------------------
# Carried moments equal the operators' definitions


def _expected_moment(src: torch.Tensor, key: str, E: int, zero_new: bool) -> torch.Tensor:
    """Depth interposition x2 then width x2 (append), written from the definitions."""
    if not key.startswith(keys.LAYER_PREFIX):
        return src
    L = src.shape[0]
    out = torch.stack([src[j // 2] for j in range(2 * L)])
    if keys.ROUTED_EXPERTS_MARKER in key or key.endswith(keys.ROUTER_SUFFIX):
        out = torch.stack([torch.stack([out[j, e % E] for e in range(2 * E)]) for j in range(2 * L)])
        if zero_new:
            out[:, E:] = 0
    if zero_new:
        out[1::2] = 0  # target layers 1, 3, 5, 7 are the new depth copies
    return out


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory):
    """The source grown (depth x2 then width x2, gaussian alpha 0.01) with carry into three layouts,
    and with carry_zero_new into one; the plain tensors of all of them and of the source."""
    root = tmp_path_factory.mktemp("grown")
    cases = {"serial": {"optimizer": "carry"}, "ep2": {"optimizer": "carry"}, "tp2": {"optimizer": "carry"},
             "ep2_zero": {"optimizer": "carry_zero_new"},
             "ep2_policy": {"optimizer": "policy", "optimizer_policy": POLICY},
             "tp2_policy": {"optimizer": "policy", "optimizer_policy": POLICY}}
    for name, changes in cases.items():
        world, par = LAYOUTS[name.split("_")[0]]
        run_in_processes(grow_body, world, (source["root"], str(root / name),
                                            _growth("tiny_depth_width.yaml", **changes), ParallelConfig(**par)))
    roots = [source["root"]] + [str(root / n) for n in cases]
    tensors = run_in_processes(plain_tensors_of_many, 1, (roots,))[0]
    return {"source": tensors[0], **dict(zip(cases, tensors[1:])), "root": root}


@pytest.mark.parametrize("name", ["serial", "ep2", "tp2", "ep2_zero"])
def test_grown_moments_equal_the_definitions(grown, name):
    src, out = grown["source"], grown[name]
    E = src[keys.ROUTER].shape[1]
    checked = 0
    for k, v in src.items():
        if not keys.is_model_space_optimizer_key(k):
            continue
        model_key = k.split(".", 3)[3]
        expected = _expected_moment(v, model_key, E, zero_new=name.endswith("zero"))
        assert out[k].shape == expected.shape, k
        assert torch.equal(out[k], expected), k
        checked += 1
    assert checked == 2 * sum(1 for k in src if k.startswith("optimizer.state.exp_avg."))
    assert checked >= 20
    # The fp32 main copy is the grown weight itself (noise included), bit for bit.
    for k in out:
        if k.startswith(keys.optimizer_state_key(keys.MAIN_PARAM_STATE, "")):
            assert torch.equal(out[k], out[k[len(keys.optimizer_state_key(keys.MAIN_PARAM_STATE, "")):]]), k


# growth.optimizer: policy -- every rule on each moment, per kind and member (docs/growth.md).
POLICY = load_recipe(raw={"growth": {"width": {"factor": 2}, "optimizer": "policy", "optimizer_policy": {
    "originals": {"exp_avg": "copy", "exp_avg_sq": "scale", "exp_avg_sq_factor": 0.5},
    "copies": {"exp_avg": "reset", "exp_avg_sq": "copy"},          # SPARKLING's asymmetric reset
    "experts": {"copies": {"exp_avg": "scale", "exp_avg_factor": 0.5, "exp_avg_sq": "interpolate",
                           "exp_avg_sq_factor": 0.25, "exp_avg_sq_toward": 1e-6}},
    "router": {"copies": {"exp_avg": "interpolate", "exp_avg_factor": 0.5, "exp_avg_toward": 1e-3,
                          "exp_avg_sq": "reset"}},
    "attention": {"originals": {"exp_avg": "reset", "exp_avg_sq": "copy"}},
    "norms": {"copies": {"exp_avg": "copy", "exp_avg_sq": "scale", "exp_avg_sq_factor": 2.0}},
    "embeddings": {"originals": {"exp_avg": "scale", "exp_avg_factor": 0.1}}}}}).growth.optimizer_policy


def _kind(key: str) -> str | None:
    """The policy's kinds (docs/growth.md), from the storage key."""
    if "norm" in key:
        return "norms"
    for marker, kind in (("router", "router"), ("experts", "experts"), ("self_attention", "attention"),
                         ("embedding", "embeddings"), ("output_layer", "embeddings")):
        if marker in key:
            return kind
    return None


def _rule(c: torch.Tensor, spec: dict, moment: str) -> torch.Tensor:
    """copy: c; scale: factor * c; interpolate: factor * c + (1 - factor) * toward; reset: 0."""
    rule, f, toward = spec[moment], spec[f"{moment}_factor"], spec[f"{moment}_toward"]
    return {"copy": c, "scale": c * f, "interpolate": c * f + (1 - f) * toward, "reset": torch.zeros_like(c)}[rule]


def _expected_policy_moment(src: torch.Tensor, key: str, E: int, moment: str) -> torch.Tensor:
    """Carried as with carry (depth x2 interposition, width x2 append), then each entry by its rule."""
    carried = _expected_moment(src, key, E, zero_new=False)
    policy = dataclasses.asdict(POLICY)
    kind = _kind(key)

    def chosen(member):
        by_kind = policy[kind][member] if kind and policy[kind] else None
        return by_kind if by_kind is not None else policy[member]

    as_copy, as_original = _rule(carried, chosen("copies"), moment), _rule(carried, chosen("originals"), moment)
    if not key.startswith(keys.LAYER_PREFIX):
        return as_original
    is_copy = torch.zeros(carried.shape, dtype=torch.bool)
    is_copy[1::2] = True                                  # new depth copies: target layers 1, 3, 5, 7
    if keys.ROUTED_EXPERTS_MARKER in key or key.endswith(keys.ROUTER_SUFFIX):
        is_copy[:, E:] = True                             # expert copies and their router rows
    return torch.where(is_copy, as_copy, as_original)


@pytest.mark.parametrize("name", ["ep2_policy", "tp2_policy"])
def test_grown_moments_follow_the_policy(grown, name):
    src, out = grown["source"], grown[name]
    E = src[keys.ROUTER].shape[1]
    kinds = set()
    for k, v in src.items():
        if not keys.is_model_space_optimizer_key(k):
            continue
        moment, model_key = k.split(".")[2], k.split(".", 3)[3]
        expected = _expected_policy_moment(v, model_key, E, moment)
        torch.testing.assert_close(out[k], expected, rtol=1e-6, atol=0, msg=k)
        kinds.add(_kind(model_key))
    assert kinds == {"norms", "router", "experts", "attention", "embeddings"}


def test_grown_checkpoint_keeps_the_step_and_resumes_in_another_layout(source, grown, kjv_dataset, tmp_path):
    from megatron.core import dist_checkpointing

    src_common = dist_checkpointing.load_common_state_dict(_iter_dir(source["root"]))["optimizer"]
    grown_common = dist_checkpointing.load_common_state_dict(_iter_dir(grown["root"] / "ep2"))["optimizer"]
    steps = lambda common: {g["step"] for g in _saved_param_groups(common)}
    assert steps(src_common) == steps(grown_common) == {3.0}
    # Grown at EP=2, resumed at TP=2 for one step, saved: Adam's step is 4 everywhere.
    recipe = write_recipe(tmp_path / "r.yaml", kjv_dataset, tmp_path / "run", model=MODEL,
                          parallel=LAYOUTS["tp2"][1], training={"train_iters": 4},
                          checkpoint={"load": str(grown["root"] / "ep2"), "save": str(tmp_path / "run")})
    with open(recipe, "a") as f:
        f.write("growth:\n  order: [depth, width]\n  depth: {mode: interposition, factor: 2}\n"
                "  width: {factor: 2, noise: gaussian, alpha: 0.01}\n  optimizer: carry\n")
    out = run_in_processes(_train_grown, 2, (recipe,))[0]
    assert [i for i, _ in out["train_losses"]] == [4]
    assert steps(dist_checkpointing.load_common_state_dict(_iter_dir(tmp_path / "run"))["optimizer"]) == {4.0}


def _train_grown(recipe_path):
    from megatron_grow.growth.grown_model import grown_model_of
    from megatron_grow.training.trainer import Trainer

    recipe = load_recipe(recipe_path)  # the model of a grown resume, by the rule `megatron-grow train` uses
    run = Trainer(recipe, model=grown_model_of(recipe.checkpoint.load, recipe.model, recipe.growth)).run()
    return {"train_losses": run.train_losses}


# ------------------------------------------------------------------------------------------------
# The first step after a function-preserving growth


def _adamw(p, g, m, v, step, lr, b1, b2, eps, wd):
    """One AdamW step from its definition (decoupled weight decay, bias correction at ``step``)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** step)
    v_hat = v / (1 - b2 ** step)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)


def test_first_step_after_function_preserving_growth(source, kjv_dataset, tmp_path):
    growth = _growth("tiny_width.yaml", optimizer="carry")
    growth = dataclasses.replace(growth, width=dataclasses.replace(growth.width, noise="antithetic"))
    run_in_processes(grow_body, 1, (source["root"], str(tmp_path / "grown"), growth, ParallelConfig()))
    step_args = dict(model=MODEL, training={"train_iters": 4, "clip_grad": 0.0, "lr_warmup_iters": 0})
    src_recipe = write_recipe(tmp_path / "s.yaml", kjv_dataset, tmp_path / "s_out", **step_args,
                              checkpoint={"load": source["root"]})
    grown_recipe = write_recipe(tmp_path / "g.yaml", kjv_dataset, tmp_path / "g_out", **step_args,
                                checkpoint={"load": str(tmp_path / "grown")})
    s, g = run_in_processes(_two_steps, 1, ([(src_recipe, []), (grown_recipe, [])],))[0]
    src_state = run_in_processes(plain_tensors_of_many, 1, ([source["root"]],))[0][0]
    assert s["lr"] == g["lr"]
    t = load_recipe(src_recipe).training
    E = src_state[keys.ROUTER].shape[1]
    dense = [k for k in s["before"] if ".mlp.experts." not in k and ".router." not in k]
    assert len(dense) > 10
    for k in dense:  # same gradient, same carried moments and step -> the source's update
        torch.testing.assert_close(g["grad"][k], s["grad"][k], rtol=1e-4, atol=1e-7, msg=k)
        torch.testing.assert_close(g["after"][k] - g["before"][k], s["after"][k] - s["before"][k],
                                   rtol=1e-3, atol=1e-7, msg=k)
    for layer in range(src_state[keys.ROUTER].shape[0]):
        for e in range(E):
            for name, storage in (("linear_fc1.weight", keys.EXPERT_FC1), ("linear_fc2.weight", keys.EXPERT_FC2)):
                orig, copy = (keys.module_expert_key(layer, x, name) for x in (e, e + E))
                src_key = keys.module_expert_key(layer, e, name)
                half = s["grad"][src_key] / 2
                if name == "linear_fc2.weight":  # fc1 identical -> same activations, gate halved
                    torch.testing.assert_close(g["grad"][orig], half, rtol=1e-4, atol=1e-9)
                    torch.testing.assert_close(g["grad"][copy], half, rtol=1e-4, atol=1e-9)
                else:  # fc2 = W2 +- eps: the pair's gradients sum to the source's
                    torch.testing.assert_close(g["grad"][orig] + g["grad"][copy], s["grad"][src_key],
                                               rtol=1e-4, atol=1e-9)
                m = src_state[keys.optimizer_state_key("exp_avg", storage)][layer, e]
                v = src_state[keys.optimizer_state_key("exp_avg_sq", storage)][layer, e]
                expected = _adamw(g["before"][orig], g["grad"][orig], m, v, 4, g["lr"], t.adam_beta1,
                                  t.adam_beta2, t.adam_eps, t.weight_decay)
                torch.testing.assert_close(g["after"][orig], expected, rtol=1e-5, atol=1e-8)
        router = f"decoder.layers.{layer}.mlp.router.weight"
        torch.testing.assert_close(g["grad"][router][:E] + g["grad"][router][E:], s["grad"][router],
                                   rtol=1e-4, atol=1e-9)


def _two_steps(runs):
    return [one_step(recipe, overrides) for recipe, overrides in runs]


# ------------------------------------------------------------------------------------------------
# Online carry


ONLINE_POLICY = ("  optimizer_policy:\n    copies: {exp_avg: reset, exp_avg_sq: scale, exp_avg_sq_factor: 0.5}\n"
                 "    router: {originals: {exp_avg: scale, exp_avg_factor: 0.25}}\n")


@pytest.mark.parametrize("mode", ["carry", "policy"])
def test_online_carry_equals_offline_carry_then_resume(source, kjv_dataset, tmp_path, mode):
    growth_yaml = ("growth:\n  order: [width]\n  width: {factor: 2, noise: gaussian, alpha: 0.01}\n"
                   f"  optimizer: {mode}\n" + (ONLINE_POLICY if mode == "policy" else ""))
    policy = load_recipe(raw={"growth": yaml.safe_load(growth_yaml)["growth"]}).growth.optimizer_policy
    par = LAYOUTS["ep2"][1]
    online = write_recipe(tmp_path / "on.yaml", kjv_dataset, tmp_path / "on", model=MODEL, parallel=par,
                          training={"train_iters": 5})
    with open(online, "a") as f:
        f.write(growth_yaml)
    run_in_processes(grow_body, 2, (source["root"], str(tmp_path / "off_init"),
                                    _growth("tiny_width.yaml", optimizer=mode, optimizer_policy=policy),
                                    ParallelConfig(**par)))
    offline = write_recipe(tmp_path / "off.yaml", kjv_dataset, tmp_path / "off", model=MODEL, parallel=par,
                           training={"train_iters": 5},
                           checkpoint={"load": str(tmp_path / "off_init"), "save": str(tmp_path / "off")})
    with open(offline, "a") as f:
        f.write(growth_yaml)
    on, off = run_in_processes(_online_then_offline, 2, (online, source["root"], offline))[0]
    assert [i for i, _ in on["train_losses"]] == [4, 5]
    assert on["train_losses"] == off["train_losses"]
    ton, toff = run_in_processes(plain_tensors_of_many, 1, ([str(tmp_path / "on"), str(tmp_path / "off")],))[0]
    for k in ton:
        assert torch.equal(ton[k], toff[k]), k
    from megatron_grow.checkpoint import io

    lineage = io.read_manifest(_iter_dir(tmp_path / "on"))["lineage"]
    assert lineage[-1]["optimizer"] == mode
    assert lineage[-1]["optimizer_policy"] == (dataclasses.asdict(policy) if policy is not None else None)


def test_grow_from_restarts_the_schedule_with_the_rewarmup(source, kjv_dataset, tmp_path):
    """train --grow-from a source at iteration 3 with lr_rewarmup_iters: the saved MCore scheduler state
    is a WSD schedule over the 9 remaining steps whose warmup is the re-warmup; at the save of iteration 5
    (2 steps after the growth point) the LR is the formula's (warmup 4 steps from 0 to lr: 2/4 of lr)."""
    from megatron.core import dist_checkpointing

    training = {"train_iters": 12, "lr_decay_style": "WSD", "lr_warmup_iters": 1, "lr_rewarmup_iters": 4,
                "lr_wsd_decay_iters": 2}
    recipe = write_recipe(tmp_path / "g.yaml", kjv_dataset, tmp_path / "g", model=MODEL, training=training,
                          checkpoint={"save_interval": 5})
    with open(recipe, "a") as f:
        f.write("growth:\n  order: [insert]\n  insert: {every: 2}\n")
    run_in_processes(train_body, 1, (recipe, [], source["root"]))
    state = dist_checkpointing.load_common_state_dict(_iter_dir(tmp_path / "g", 5))["opt_param_scheduler"]
    assert (state["lr_warmup_steps"], state["lr_decay_steps"], state["num_steps"]) == (4, 9, 2)
    t = load_recipe(recipe).training
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    from megatron_grow.training.optimizer import build_scheduler

    scheduler = build_scheduler(optimizer, load_recipe(recipe), 9, restarted=True)
    scheduler.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(t.lr * 2 / 4, rel=1e-12)


def _online_then_offline(online, grow_from, offline):
    return [train_body(online, [], grow_from), _train_grown(offline)]


# ------------------------------------------------------------------------------------------------
# Bad combinations


def _main(argv):
    import contextlib
    import io as _io

    from megatron_grow.__main__ import main

    err = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_carry_from_a_checkpoint_without_model_space_state_exits_2(tmp_path):
    from tests.distributed.bodies import build_save_forward, tiny_model

    src = tmp_path / "weights_only"
    run_in_processes(build_save_forward, 1, (tiny_model(num_moe_experts=8), ParallelConfig(), str(src)))
    before = sorted(os.listdir(_iter_dir(src)))
    code, err = _main(["grow", "--load", str(src), "--save", str(tmp_path / "out"), "--recipe",
                       "configs/growth/tiny_width.yaml", "--no-verify", "--quiet", "growth.optimizer=carry"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model space" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(_iter_dir(src))) == before


def test_carry_with_random_new_experts_exits_2(source, tmp_path):
    code, err = _main(["grow", "--load", source["root"], "--save", str(tmp_path / "out"), "--recipe",
                       "configs/growth/tiny_width.yaml", "--no-verify", "--quiet", "growth.optimizer=carry",
                       "growth.width.new_experts=random"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "new_experts: random" in lines[0], err
    assert not (tmp_path / "out").exists()
