"""Failures that used to be swallowed are named, and a layout we cannot run is refused.

* ``parallel.context_parallel_size > 1`` is refused (one line naming the key) until something
  splits sequences across context-parallel ranks;
* the former silent ``except Exception`` fallbacks now warn, naming what failed: the MoE
  aux-loss logging (trainer), the architecture in a Megatron-LM ``common.pt`` (manifest), the
  schedule read for advice (analysis.advice) and a broken Transformer Engine install (specs).

Each failure is a real one (an uninitialised process group, an invalid value, a corrupt file, an
import that raises), not a replaced function.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_grow.__main__ import main
from megatron_grow.config.layout_rules import model_layout_problems
from megatron_grow.config.loader import load_recipe
from megatron_grow.config.schema import ParallelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "models", "tiny.yaml")


# ------------------------------------------------------------------------------------------------
# Context parallelism


def test_context_parallel_above_one_is_refused_naming_the_key():
    model = load_recipe(TINY).model
    assert model_layout_problems(model, ParallelConfig(context_parallel_size=1)) == []
    problems = model_layout_problems(model, ParallelConfig(context_parallel_size=2))
    assert len(problems) == 1, problems
    assert problems[0].startswith("parallel.context_parallel_size (2)") and "not supported" in problems[0]


def test_plan_cli_refuses_context_parallel(capsys):
    code = main(["plan", "--config", TINY, "parallel.context_parallel_size=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "parallel.context_parallel_size" in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------
# Fallbacks that warn


_AUX_LOSS_PROBE = """
import warnings
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron_grow.training.trainer import _aux_loss

assert not parallel_state.model_parallel_is_initialized()
# A real tracked loss, then MCore's cross-rank reduction without process groups: it raises.
moe_utils.save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(0.5), layer_number=1, num_layers=2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    value = _aux_loss()
print("VALUE", value)
for w in caught:
    print("WARNING", w.category.__name__, w.message)
"""


def test_aux_loss_logging_failure_warns_and_names_it():
    # A fresh interpreter: no process groups there (other tests in this process may have set them up).
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _AUX_LOSS_PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "VALUE nan" in out.stdout, out.stdout
    assert re.search(r"WARNING RuntimeWarning MoE aux-loss logging failed \(\w+", out.stdout), out.stdout


def _megatron_lm_style_checkpoint(path, args) -> str:
    """A Megatron-LM checkpoint directory's self-description: metadata.json + common.pt (no manifest)."""
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}, f)
    torch.save({"args": args, "iteration": 7, "num_floating_point_operations_so_far": 1.0e9},
               os.path.join(path, "common.pt"))
    return str(path)


def test_unusable_megatron_args_are_refused_naming_the_argument(tmp_path):
    # No silent fallback: an architecture the args cannot describe is one clear error naming the
    # argument (the resolution in checkpoint.architecture), not a model of None.
    from megatron_grow.checkpoint.manifest import read_checkpoint_info
    from megatron_grow.errors import CheckpointError

    args = argparse.Namespace(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
                              swiglu=True, position_embedding_type="learned_absolute")
    ckpt = _megatron_lm_style_checkpoint(tmp_path / "iter_0000007", args)
    with pytest.raises(CheckpointError, match=r"position_embedding_type"):
        read_checkpoint_info(ckpt, 7)


def test_usable_megatron_args_do_not_warn(tmp_path):
    from megatron_grow.checkpoint.manifest import read_checkpoint_info

    tiny = load_recipe(TINY).model
    args = argparse.Namespace(
        num_layers=tiny.num_layers, hidden_size=tiny.hidden_size, num_attention_heads=tiny.num_attention_heads,
        seq_length=tiny.seq_length, num_experts=tiny.num_moe_experts, moe_router_topk=tiny.moe_router_topk,
        moe_ffn_hidden_size=tiny.moe_ffn_hidden_size, ffn_hidden_size=tiny.moe_ffn_hidden_size, swiglu=True,
        position_embedding_type="rope", group_query_attention=True, num_query_groups=tiny.num_query_groups,
        kv_channels=tiny.kv_channels, padded_vocab_size=tiny.vocab_size, vocab_size=tiny.vocab_size,
        normalization="RMSNorm", qk_layernorm=True, untie_embeddings_and_output_weights=True,
        add_bias_linear=False)
    ckpt = _megatron_lm_style_checkpoint(tmp_path / "iter_0000007", args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        info = read_checkpoint_info(ckpt, 7)
    assert info.model is not None and info.model.num_layers == tiny.num_layers
    assert info.model.num_moe_experts == tiny.num_moe_experts


def test_unreadable_common_pt_for_advice_warns(tmp_path):
    from megatron_grow.analysis.advice import training_schedule
    from megatron_grow.checkpoint.manifest import CheckpointInfo

    ckpt = _megatron_lm_style_checkpoint(tmp_path / "iter_0000007", {})
    with open(os.path.join(ckpt, "common.pt"), "wb") as f:
        f.write(b"\x00not a pickle" * 8)
    info = CheckpointInfo(ckpt, 7, None, {}, [], {}, {})
    with pytest.warns(RuntimeWarning, match=r"common\.pt is unreadable \(\w+"):
        assert training_schedule(info) == {}


def test_broken_transformer_engine_install_warns(tmp_path, monkeypatch):
    from megatron_grow.models.specs import te_available

    # An installed-but-broken Transformer Engine: the package exists, its import raises.
    pkg = tmp_path / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pytorch" / "__init__.py").write_text("raise OSError('libtransformer_engine.so: cannot open shared "
                                                 "object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        with pytest.warns(RuntimeWarning, match=r"Transformer Engine is installed but failed to import "
                                                r"\(OSError: libtransformer_engine"):
            assert te_available() is False
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
            sys.modules.pop(name, None)


def test_absent_transformer_engine_is_silent(monkeypatch):
    from megatron_grow.models.specs import te_available

    if any(m.split(".")[0] == "transformer_engine" for m in sys.modules) or \
            __import__("importlib").util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here; the absent case cannot be checked")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert te_available() is False
