"""Build the paper's MoE as a Megatron-Core ``GPTModel``.

Parallel state must already be initialised (``megatron_grow.parallel.init``), also for
``meta=True``, which builds on the meta device (no weight init) for counting parameters
without memory.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from megatron_grow.config.layout_rules import padded_vocab_size
from megatron_grow.config.schema import ModelConfig, ParallelConfig
from megatron_grow.models.mcore_config import parameter_device, to_transformer_config
from megatron_grow.models.specs import decoder_block_spec


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig | None = None, *,
                    params_dtype: torch.dtype = torch.float32, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None,
                    use_te: bool | None = None, meta: bool = False, initialize: bool = True) -> GPTModel:
    """One pipeline stage (or model chunk) of the model, on this rank's slice of TP/EP.

    ``initialize=False`` leaves weights uninitialised (``torch.empty``): for models whose every
    weight is about to be loaded, e.g. growth on load, where MCore's init would be wasted time.
    """
    parallel = parallel or ParallelConfig()
    config = to_transformer_config(model, parallel, params_dtype)
    if meta or not initialize:
        # Initialising meta tensors, or weights about to be overwritten, is wasted time.
        config.perform_initialization = False
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    with torch.device("meta") if meta else contextlib.nullcontext():
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, use_te, vp_stage, model.moe_expert_backend,
                                                      qk_norm_across_heads=model.qk_layernorm_across_heads),
            vocab_size=padded_vocab_size(model, parallel.tensor_model_parallel_size),
            max_sequence_length=model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            rotary_percent=model.rotary_percent,
            vp_stage=vp_stage,
        )
    device = None if meta else parameter_device(config)
    if device is not None:
        # MCore's router creates its weight on the default device (the CPU on a GPU machine) and
        # moves it at its first forward; every user of a built model gets it whole on one device.
        gpt.to(device)
    return gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig | None = None, *,
                       params_dtype: torch.dtype = torch.float32, initialize: bool = True,
                       meta: bool = False, use_te: bool | None = None) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without virtual PP).
    ``meta=True``: on the meta device (shapes and sharding only, no memory). ``use_te``: None picks
    the TE spec when TE imports on a GPU; False forces the local spec (equal-terms comparisons)."""
    parallel = parallel or ParallelConfig()
    vpp = parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    return [build_gpt_model(model, parallel, params_dtype=params_dtype, vp_stage=v, initialize=initialize,
                            meta=meta, use_te=use_te) for v in stages]
