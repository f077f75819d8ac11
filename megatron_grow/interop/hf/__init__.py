"""Hugging Face safetensors checkpoints <-> our ``torch_dist`` checkpoints.

* ``families/``: one module per ``transformers`` class: config translation (with refusals for
  what the other side cannot hold) and the on-disk tensor names.
* ``tensor_map``: which rows of which HF tensors make up each Megatron-Core stored tensor.
* ``safetensors_io``: reading slices of (sharded) safetensors, writing shards progressively.
* ``importer`` / ``exporter``: the two conversions, streaming a tensor or a layer at a time.
"""
