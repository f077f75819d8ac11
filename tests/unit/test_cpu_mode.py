"""One test per CPU-mode adaptation (megatron_grow/platform/cpu.py), against real megatron-core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_grow.platform import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is a no-op with CUDA")


@pytest.fixture(scope="module", autouse=True)
def cpu_mode():
    assert cpu.apply_cpu_adaptations() is True
    assert cpu.apply_cpu_adaptations() is True  # idempotent


def test_every_adaptation_is_registered():
    assert set(cpu.ADAPTATIONS) == {"current_device", "synchronize", "rng_tracker", "te_general_gemm", "mla_te_flag",
                                    "cuda_pinned_modules", "gloo_collectives", "tensor_methods",
                                    "writer_results_queue", "torch_compile"}


def test_current_device_is_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    assert torch.cuda.current_device() == torch.device("cpu")
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)  # builds inv_freq on current_device()
    assert rope.inv_freq.device.type == "cpu"


def test_synchronize_is_a_no_op():
    assert torch.cuda.synchronize() is None


def test_rng_tracker_forks_cpu_generator_states():
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("a", 11)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default state"
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(first, second), "the forked stream advances"
    torch.manual_seed(11)
    assert torch.equal(first, torch.rand(3)), "the forked stream is seeded by add()"
    state = mcore_random._get_cuda_rng_state()
    mcore_random._set_cuda_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)


def test_model_parallel_seed_runs_on_cpu():
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.parallel.init import initialize_distributed

    if not ps.model_parallel_is_initialized():
        initialize_distributed(ParallelConfig())
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    assert set(states) >= {"model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"}


def test_mla_builds_without_te():
    """Item 12: MCore's MLA module must not take the TE stand-ins for real TE classes."""
    from megatron.core.transformer import multi_latent_attention

    assert multi_latent_attention.HAVE_TE is False


def test_te_general_gemm_defined_without_te():
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "te_general_gemm") and moe_utils.te_general_gemm is None


@pytest.mark.slow
def test_te_absent_workaround_is_applied_on_a_cuda_machine_too():
    """A GPU machine without Transformer Engine (a plain pip environment): the entry point's call
    must still define ``te_general_gemm``, else MCore's router gating raises NameError."""
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"  # what a GPU machine answers
        "from megatron_grow.platform import cpu\n"
        "assert cpu.apply_cpu_adaptations() is False\n"  # CPU mode itself stays off
        "from megatron.core.transformer.moe.moe_utils import router_gating_linear\n"
        "x = torch.randn(3, 4, requires_grad=True)\n"
        "w = torch.randn(5, 4, requires_grad=True)\n"
        "out = router_gating_linear(x, w, None, torch.float32)\n"
        "out.sum().backward()\n"
        "assert torch.allclose(out, x @ w.t()) and x.grad is not None\n"
        "print('gating ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gating ok" in out.stdout


def test_cuda_pinned_factories_land_on_cpu():
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    for module in (schedules, clip_grads):
        t = module.torch.zeros(2, device="cuda")
        assert t.device.type == "cpu"
        assert module.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert schedules.torch.float32 is torch.float32  # everything else is the real torch


def test_streams_and_events_are_stand_ins():
    from megatron.core.transformer.moe import token_dispatcher

    cuda = token_dispatcher.torch.cuda
    stream = cuda.Stream()
    event = cuda.Event()
    event.record(stream)
    stream.wait_event(event)
    with cuda.stream(stream):
        pass
    assert cuda.current_stream().query()


def test_tensor_type_answers_cuda_name_and_cuda_is_identity():
    t = torch.zeros(2)
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # with an argument it still converts
    assert t.cuda() is t


def test_writer_results_queue_is_fast_fork_queue():
    import time

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = time.perf_counter()
    q = filesystem_async._get_write_results_queue()
    q.put(1)
    assert q.get() == 1
    assert filesystem_async._get_write_results_queue() is q
    del start  # speed is measured in benchmarks, not asserted here


@pytest.mark.slow
def test_gloo_collectives_handle_uneven_sizes():
    from megatron_grow.parallel.spawn import run_in_processes

    results = run_in_processes(_uneven_collectives_body, 2)
    assert results[0] == results[1] == "ok"


def _uneven_collectives_body():
    import torch.distributed as dist

    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.parallel.init import initialize_distributed

    initialize_distributed(ParallelConfig())
    from megatron.core.tensor_parallel import mappings

    rank = dist.get_rank()
    sizes = [3, 1]
    mine = torch.full((sizes[rank], 2), float(rank + 1))
    outs = [torch.empty(n, 2) for n in sizes]
    mappings.torch.distributed.all_gather(outs, mine)
    assert torch.equal(outs[0], torch.full((3, 2), 1.0)) and torch.equal(outs[1], torch.full((1, 2), 2.0))
    full = torch.arange(8.0).view(4, 2) * (rank + 1)
    out = torch.empty(sizes[rank], 2)
    mappings.torch.distributed.reduce_scatter(out, list(torch.split(full, sizes)))
    expect = (torch.arange(8.0).view(4, 2) * 3)[: 3] if rank == 0 else (torch.arange(8.0).view(4, 2) * 3)[3:]
    assert torch.equal(out, expect)
    # all_to_all_single with split sizes given as a tensor (as MCore keeps them)
    send = torch.arange(4.0) + 10 * rank
    recv = torch.empty(4)
    mappings.torch.distributed.all_to_all_single(recv, send, torch.tensor([2, 2]), torch.tensor([2, 2]))
    assert torch.equal(recv, torch.tensor([0.0, 1.0, 10.0, 11.0]) + 2 * rank)
    return "ok"


@pytest.mark.slow
def test_no_op_when_cuda_is_available():
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from megatron_grow.platform import cpu\n"
        "orig, orig_compile = torch.cuda.current_device, torch.compile\n"
        "assert cpu.apply_cpu_adaptations() is False\n"
        "assert torch.cuda.current_device is orig and torch.Tensor.type is cpu._real_tensor_type\n"
        "assert torch.compile is orig_compile\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "untouched" in out.stdout


def test_mcore_fused_functions_run_eagerly_without_building_kernels(tmp_path):
    """A fresh process in CPU mode calls an MCore ``@jit_fuser`` (torch.compile) function: the
    value is the definition's, inductor writes nothing (no g++ run) into a fresh cache, and neither
    dynamo nor inductor is even imported (their import is ~2 s of every process's start-up)."""
    cache = tmp_path / "inductor"
    code = ("import torch\n"
            "from megatron_grow.platform import cpu\n"
            "cpu.apply_cpu_adaptations()\n"
            "from megatron.core.activations import squared_relu\n"
            "import sys\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
            "print(squared_relu(torch.tensor([-2.0, 3.0])).tolist())\n")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "[0.0, 9.0]"]  # nothing compiled; relu(x)^2
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*")), sorted(cache.rglob("*"))


def test_megatron_core_loads_without_importing_wandb_which_stays_importable():
    """Item 13: MCore's first import skips wandb (start-up time); our own ``import wandb`` still works."""
    code = ("import sys\n"
            "from megatron_grow.platform import cpu\n"
            "cpu.apply_cpu_adaptations()\n"
            "import megatron.core.timers as timers\n"
            "from megatron.core.inference.contexts import dynamic_context\n"
            "print('wandb' in sys.modules, timers.wandb, dynamic_context.HAVE_WANDB)\n"
            "import wandb\n"
            "print(type(wandb).__name__, hasattr(wandb, 'init'))\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONWARNINGS="ignore"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-2:] == ["False None False", "module True"]
