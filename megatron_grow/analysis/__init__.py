"""Checkpoint analysis behind ``megatron-grow inspect / weight-norms / flops / advise``.

Reads checkpoints through ``checkpoint.reader`` (tensor regions from ``torch_dist`` files in one
plain process: no model, no torch.distributed); ``inspection``, ``weight_norms``, ``sunk_cost``
and ``advice`` build the reports the CLI modules print; ``synthetic`` writes runs with a known
weight-norm profile for tests and demonstrations.
"""
