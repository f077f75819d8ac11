"""CPU mode: every adaptation Megatron-Core 0.16.1 needs to train and checkpoint on CPU with gloo.

Megatron-Core assumes CUDA in a handful of places. Each item below is one such place, with
the smallest change that lets the *same* MCore code path (models, token dispatchers,
pipeline schedules, DDP, the distributed optimizer, dist_checkpointing) run on CPU:

====  ===============================================  =========================================
item  where MCore assumes CUDA                          what CPU mode does
====  ===============================================  =========================================
1     ``torch.cuda.current_device()`` as a device      returns ``torch.device("cpu")``
2     ``torch.cuda.synchronize()`` (checkpoint writer)  no-op
3     CUDA RNG tracker state get/set, manual seed       tracker states are CPU generator states
4     ``moe_utils.te_general_gemm`` undefined w/o TE    defined as ``None`` (router uses torch); also on CUDA
5     ``device="cuda"`` literals in schedules, p2p,     those modules see a ``torch`` whose tensor
      optimizer, clip_grads, DDP buffers, utils         factories map ``"cuda"`` to ``"cpu"``
6     CUDA streams/events (alltoall dispatcher, DDP)    stand-in stream/event objects (CPU is
                                                        synchronous)
7     collectives gloo lacks: split sizes kept as      split sizes become lists; uneven
      tensors, uneven ``all_gather``, list              all_gather pads; reduce_scatter is
      ``reduce_scatter`` (MoE token dispatch, TP x EP)  all_reduce + own slice
8     ``param.grad.type() == 'torch.cuda.FloatTensor'``  ``Tensor.type()`` (no argument) on a CPU
      (clip_grads, distributed optimizer)               tensor answers with the ``torch.cuda`` name
9     ``tensor.cuda()`` / ``.to("cuda")`` on optimizer  ``Tensor.cuda`` returns the tensor on CPU
      state and buffers
10    checkpoint writer's results queue from a spawn    a fork Manager (startup cost only: ~7 s
      Manager                                           per process on 2 cores otherwise)
11    ``torch.compile`` (MCore's ``jit_fuser``: MoE    off: ``torch.compile`` returns the function,
      activations, router expert bias, dispatcher)      set before MCore's first import
12    MLA's ``HAVE_TE`` is True without TE (the        set to the TE extension's own ``HAVE_TE``
      extension imports with stand-in classes), so      (False); also on CUDA
      its ``isinstance(linear_proj, TELinear)`` raises
13    MCore imports ``wandb`` as it loads (inference   MCore's first import sees it as absent:
      context, timers) for writers we never pass        ours imports it itself; also on CUDA
      (0.5 s of every process's start-up)
====  ===============================================  =========================================

``apply_cpu_adaptations()`` applies all of them once and is a no-op when CUDA is available,
except items 4, 12 and 13: they depend on what is installed, not on the device (a plain pip
environment on a GPU has no Transformer Engine either), so it is applied whenever TE is
absent, with or without CUDA (:func:`apply_install_workarounds`).
It is called explicitly by the entry points only (the CLI's ``main``, ranks started by
``parallel.spawn``, the test fixtures); ``parallel.init.initialize_distributed`` refuses to
start on CPU without it, so nothing is patched as a side effect of a library call.
Items are individually testable through :data:`ADAPTATIONS`. Written for megatron-core
0.16.1 (pinned in setup.py); a different version is refused rather than half-patched.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

# Megatron-Core (and torch._dynamo) are imported inside the functions below, on purpose (cost):
# __main__ imports this module before every command, and with CUDA apply_cpu_adaptations returns
# before importing any of it, so a GPU run does not pay the ~3-5 s here; on CPU the version check
# runs before any patch.
MCORE_VERSION = "0.16.1"
CPU = torch.device("cpu")

_applied = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# 1, 2: current_device and synchronize


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: CPU  # used as `device=torch.cuda.current_device()`


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda device=None: None


# ----------------------------------------------------------------------------------------------
# 3: RNG tracker on the CPU generator


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    base = mcore_random.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        """The MCore tracker with its named states kept as CPU generator states.

        On CPU the "device" generator *is* the CPU generator, so forking swaps its state in
        and out; MCore's check that the CPU state is unchanged inside a fork does not apply.
        """

        def __init__(self, *args, **kwargs):
            kwargs["use_cudagraphable_rng"] = False
            super().__init__(*args, **kwargs)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # model_parallel_cuda_manual_seed seeds "the device": on CPU that is the CPU generator.
    mcore_random.torch = _torch_for(mcore_random.torch, cuda_overrides={
        "manual_seed": torch.manual_seed,
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
    })
    # Trackers built before this call (module import time) are replaced on next initialise.
    mcore_random.initialize_rng_tracker(force_reset=True)


# ----------------------------------------------------------------------------------------------
# 4: te_general_gemm


def _patch_te_general_gemm() -> None:
    """MCore 0.16.1's ``moe_utils`` imports ``te_general_gemm`` inside ``try: ... except ImportError``
    but its router gating reads the name unconditionally: without TE every MoE forward raises
    ``NameError``. ``None`` is the value its own code tests for (then it uses ``torch.mm``)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_mla_te_flag() -> None:
    """Item 12: MCore 0.16.1's ``multi_latent_attention`` sets ``HAVE_TE = True`` whenever
    ``megatron.core.extensions.transformer_engine`` imports, which it does without TE (its TE classes
    are then stand-ins), and building an MLA layer evaluates ``isinstance(self.linear_proj, TELinear)``
    with a stand-in: TypeError. The extension module's own ``HAVE_TE`` says whether TE is there."""
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import multi_latent_attention

    if not te_extension.HAVE_TE:
        multi_latent_attention.HAVE_TE = False


def apply_install_workarounds() -> None:
    """The workarounds that depend on what is installed rather than on the device (items 4, 12, 13)."""
    _import_mcore_without_wandb()
    _patch_te_general_gemm()
    _patch_mla_te_flag()


def _import_mcore_without_wandb() -> None:
    """Item 13: Megatron-Core's inference context and timers import ``wandb`` when they load, for a
    writer object we never hand them (our metrics import wandb themselves, when asked to log to it).
    Its import is ~0.5 s of every process's start-up, so MCore's first import sees it as absent (a
    ``None`` entry in ``sys.modules`` makes ``import wandb`` raise ImportError, which MCore catches);
    the entry is removed at once, so a later ``import wandb`` works as usual."""
    if "megatron.core" in sys.modules or "wandb" in sys.modules:
        return
    sys.modules["wandb"] = None
    try:
        import megatron.core  # noqa: F401
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]


# ----------------------------------------------------------------------------------------------
# 5, 6: a `torch` stand-in for modules that hard-code CUDA


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    if isinstance(device, int):  # a CUDA ordinal
        return CPU
    return device


def _wrap_factory(fn: Callable) -> Callable:
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)
    factory.__wrapped__ = fn
    return factory


class _NullStream:
    """A CUDA stream stand-in: CPU work is synchronous, so waiting and recording do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


@contextlib.contextmanager
def _null_stream_context(stream=None):
    yield


_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace")


def _torch_for(real_torch: Any, cuda_overrides: dict | None = None) -> types.SimpleNamespace:
    """A module-like object that is ``torch`` except for CUDA-pinned factories and ``torch.cuda``."""

    class TorchOnCPU(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real_torch, name)

    stand_in = TorchOnCPU("torch")
    for name in _FACTORIES:
        setattr(stand_in, name, _wrap_factory(getattr(real_torch, name)))

    class CudaOnCPU(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real_torch.cuda, name)

    cuda = CudaOnCPU("torch.cuda")
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = _null_stream_context
    # Whatever torch.cuda.current_device answers (CPU under item 1), read at call time, so these
    # modules and MCore's others agree on one device.
    cuda.current_device = lambda: torch.cuda.current_device()
    cuda.synchronize = lambda device=None: None
    cuda.is_available = lambda: False
    for name, fn in (cuda_overrides or {}).items():
        setattr(cuda, name, fn)
    stand_in.cuda = cuda
    return stand_in


# Modules that create tensors with a literal device="cuda" or use CUDA streams/events.
CUDA_PINNED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.rerun_state_machine",
)


def _patch_cuda_pinned_modules() -> None:
    for name in CUDA_PINNED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = _torch_for(torch)


# ----------------------------------------------------------------------------------------------
# 7: collectives gloo lacks or takes differently (tensor_parallel/mappings.py, used by the MoE
#    token dispatchers): split sizes as tensors, uneven all_gather, list reduce_scatter.


def _as_int_list(sizes):
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor):
        return [int(x) for x in sizes.tolist()]
    return [int(x) for x in sizes]


def _gloo_all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                            async_op=False):
    return torch.distributed.all_to_all_single(output, input, _as_int_list(output_split_sizes),
                                               _as_int_list(input_split_sizes), group=group, async_op=async_op)


def _gloo_all_gather(tensor_list, tensor, group=None, async_op=False):
    """all_gather into a list whose entries may differ in their first dimension (gloo needs equal)."""
    sizes = [t.shape[0] for t in tensor_list]
    if len(set(sizes)) == 1 and tensor.shape[0] == sizes[0]:
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    longest = max(sizes)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(gathered, padded, group=group)
    for out, full, n in zip(tensor_list, gathered, sizes):
        out.copy_(full[:n])
    return None


def _gloo_reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
    """Reduce-scatter over a list of (possibly uneven) inputs as all-reduce + own slice (gloo has none)."""
    rank = torch.distributed.get_rank(group)
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in input_list]).contiguous()
    torch.distributed.all_reduce(flat, op=op, group=group)
    start = sum(t.shape[0] for t in input_list[:rank])
    output.copy_(flat[start:start + input_list[rank].shape[0]].view_as(output))
    return None


class _GlooDistributed(types.ModuleType):
    """``torch.distributed`` with the three collectives above replaced."""

    def __init__(self):
        super().__init__("torch.distributed")
        self.all_to_all_single = _gloo_all_to_all_single
        self.all_gather = _gloo_all_gather
        self.reduce_scatter = _gloo_reduce_scatter

    def __getattr__(self, name):
        return getattr(torch.distributed, name)


def _patch_gloo_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    if not isinstance(mappings.torch, types.ModuleType) or mappings.torch is torch:
        mappings.torch = _torch_for(torch)
    mappings.torch.distributed = _GlooDistributed()


# ----------------------------------------------------------------------------------------------
# 8, 9: tensor type names and .cuda()

_real_tensor_type = torch.Tensor.type
_real_tensor_cuda = torch.Tensor.cuda


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        # MCore compares against 'torch.cuda.FloatTensor' etc. to pick fp32/fp16/bf16 params.
        return _real_tensor_type(self).replace("torch.", "torch.cuda.", 1)
    return _real_tensor_type(self, dtype, non_blocking, **kwargs)


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _patch_tensor_methods() -> None:
    torch.Tensor.type = _tensor_type
    torch.Tensor.cuda = _tensor_cuda


# ----------------------------------------------------------------------------------------------
# 10: the checkpoint writer's results queue


def _patch_writer_results_queue() -> None:
    """dist_checkpointing creates its writer results queue with a *spawn* Manager, whose server
    re-imports torch and megatron (~7 s on 2 cores, once per process). MCore forks its writer
    processes anyway; a fork Manager serves the same queue in milliseconds."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def fork_queue():
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = fork_queue


# ----------------------------------------------------------------------------------------------
# 11: torch.compile


def _eager_compile(model: Callable | None = None, **_options: Any) -> Callable:
    """``torch.compile`` in CPU mode: the function itself (also used as ``@torch.compile(...)``)."""
    return model if model is not None else (lambda fn: fn)


def _disable_torch_compile() -> None:
    """Inductor on CPU builds C++ kernels at the first step, with g++ and probe processes that run
    in the rank's process group. A preemption signal forwarded to that group kills them: the rank
    crashes with a C++ compile error instead of saving (seen in CI). At this scale compiling also
    costs seconds per fresh machine for no gain. MCore wraps its fused functions with
    ``torch.compile`` (its ``jit_fuser``) as it imports, so this runs before MCore's first import:
    they stay plain functions, and torch._dynamo and inductor are never imported (about 2 s of every
    process's start-up on 2 cores). A function compiled before (dynamo already imported) runs eagerly
    through dynamo's own switch."""
    torch.compile = _eager_compile
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].config.disable = True


# ----------------------------------------------------------------------------------------------

ADAPTATIONS: dict[str, Callable[[], None]] = {
    "current_device": _patch_current_device,
    "synchronize": _patch_synchronize,
    "rng_tracker": _patch_rng_tracker,
    "te_general_gemm": _patch_te_general_gemm,
    "mla_te_flag": _patch_mla_te_flag,
    "cuda_pinned_modules": _patch_cuda_pinned_modules,
    "gloo_collectives": _patch_gloo_collectives,
    "tensor_methods": _patch_tensor_methods,
    "writer_results_queue": _patch_writer_results_queue,
    "torch_compile": _disable_torch_compile,
}


def apply_cpu_adaptations() -> bool:
    """Apply every CPU adaptation once. Returns True when CPU mode is active. The workarounds that
    depend on what is installed (:func:`apply_install_workarounds`) are applied with CUDA too."""
    global _applied
    on_cpu = not cuda_present()
    if on_cpu and not _applied:
        _disable_torch_compile()  # item 11 goes first: before anything imports Megatron-Core
    apply_install_workarounds()  # with CUDA too: TE may be missing on a GPU machine
    if not on_cpu:
        return False
    if _applied:
        return True
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != MCORE_VERSION:
        raise RuntimeError(f"megatron_grow's CPU mode is written for megatron-core {MCORE_VERSION}; "
                           f"found {version}. Install megatron-core=={MCORE_VERSION}.")
    for patch in ADAPTATIONS.values():
        patch()
    _applied = True
    return True


def cpu_mode_active() -> bool:
    return _applied
