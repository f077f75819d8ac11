"""Checkpoint analysis behind ``megatron-grow inspect / weight-norms / flops / advise``.

``reader`` reads tensor regions from ``torch_dist`` checkpoints in one plain process (no model,
no torch.distributed); ``inspection``, ``weight_norms``, ``sunk_cost`` and ``advice`` build the
reports the CLI modules print.
"""
