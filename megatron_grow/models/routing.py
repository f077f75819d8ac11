"""Per-expert routing counts, read from MCore's routers during forward passes.

Used by training logs (expert load max/min) and by growth verification (originals vs copies).
Counts are tokens routed to each expert (a token counts once per chosen expert), per layer.
"""

from __future__ import annotations

import torch

from megatron_grow.parallel.collectives import all_reduce_host


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP (or other ``.module``) wrapper."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


class RoutingCounter:
    """Forward hooks on every router of ``model_chunks`` that add up routing maps."""

    def __init__(self, model_chunks, keep_maps: bool = False):
        self.counts: dict[int, torch.Tensor] = {}
        self.keep_maps = keep_maps  # also keep each forward's per-token routing map (verify compares them)
        self.maps: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for chunk in model_chunks:
            for layer in unwrap(chunk).decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is None:
                    continue  # a dense layer of a mixed stack (model.moe_layer_freq): no routing, a zero row
                idx = layer.layer_number - 1  # MCore layer_number is 1-based and global
                self.handles.append(router.register_forward_hook(self._hook(idx)))

    def _hook(self, layer_idx):
        def hook(module, inputs, output):
            _, routing_map = output
            c = routing_map.sum(dim=0).to(torch.float64).cpu()
            self.counts[layer_idx] = self.counts.get(layer_idx, 0) + c
            if self.keep_maps:
                self.maps.setdefault(layer_idx, []).append(routing_map.detach().bool().cpu())
        return hook

    def snapshot(self, num_layers: int, num_experts: int, reset: bool = True) -> torch.Tensor:
        """``[num_layers, num_experts]`` counts summed over all ranks (collective)."""
        table = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        for i, c in self.counts.items():
            table[i] += c
        if torch.distributed.is_initialized():
            all_reduce_host(table)
        if reset:
            self.counts = {}
        return table

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def gathered(self, num_layers: int, num_experts: int) -> torch.Tensor:
        """Final counts, and the hooks removed."""
        table = self.snapshot(num_layers, num_experts)
        self.close()
        return table
