"""The growth operator interface, and the plan that composes operators.

A growth operator (depth, width, ...) is one class, registered in ``growth.operators``
(docs/extending.md walks through adding one). It owns:

- its recipe section: ``config_type``, a ``GrowthSection`` dataclass of ``config.schema`` whose
  methods are the pure rules (the grown model, the section's problems against a model);
- its index maps: ``layer_map`` / ``expert_map`` (per layer), output index -> input index per axis;
- its per-tensor transforms: what it does to a tensor after the engine has gathered it through
  the composed maps (``expert_tensor``, ``router``, ``expert_bias``; noise included) and which
  tensors it zeroes (``zeroes``, applied after every transform, in every order);
- its optimizer rule: Adam moments follow the index maps with no transform, and entries its maps
  mark as copies count as new (``carry_zero_new``); ``carry_problem`` refuses a carry it cannot do.

The defaults leave everything alone, so an operator overrides only what it changes. A
``GrowthPlan`` is the ordered list of bound operators plus their composed index maps; the engine
(``growth.transforms``, ``growth.retarget``, ``growth.reference``) asks the plan, never an
operator by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from megatron_grow.config.schema import GrowthConfig, GrowthSection, ModelConfig
from megatron_grow.growth.mapping import IndexMap, identity_map
from megatron_grow.growth.noise import Moments


@dataclass(frozen=True)
class GrowthOperator:
    """One growth operator bound to its recipe section (``config``); see the module docstring."""

    config: GrowthSection
    name: ClassVar[str] = ""                              # the recipe's growth.<name> and growth.order entry
    config_type: ClassVar[type[GrowthSection]] = GrowthSection

    # ---- index maps (pure) --------------------------------------------------------------------

    def layer_map(self, model: ModelConfig) -> IndexMap:
        """Output layer -> input layer when this operator is applied to ``model``.

        Args:
            model: the model the operator is applied to.

        Returns:
            A map with one entry per layer of ``self.config.grown_model(model)``.
        """
        return identity_map(model.num_layers)

    def expert_map(self, model: ModelConfig, layer: int, source_layer: int) -> IndexMap:
        """Output expert -> input expert of one layer when this operator is applied to ``model``.

        Args:
            model: the model the operator is applied to.
            layer: the layer in ``model`` (this operator's input) whose experts are mapped.
            source_layer: the layer of the growth's source model that ``layer`` descends from (a
                depth copy of layer ``s`` has ``s``; what calibration statistics are keyed by).

        Returns:
            A map with one entry per expert of ``self.config.grown_model(model)``.
        """
        return identity_map(model.num_moe_experts)

    # ---- per-tensor transforms ----------------------------------------------------------------

    def zeroes(self, plan: GrowthPlan, target_layer: int, name: str) -> bool:
        """Whether ``name`` (a state-dict or logical key) in ``target_layer`` starts at zero.

        Args:
            plan: the plan this operator is part of.
            target_layer: the layer index in the grown model.
            name: a state-dict key (full or relative to the layer) or a logical key.

        Returns:
            True to zero the tensor (after every transform, whatever the order).
        """
        return False

    def expert_tensor(self, plan: GrowthPlan, value: torch.Tensor, *, logical_key: str, target_layer: int,
                      target_expert: int, std: float, full_shape: tuple[int, ...], region: tuple) -> torch.Tensor:
        """One routed expert's tensor (or ``region`` of it) after this operator.

        Args:
            plan: the plan this operator is part of.
            value: the tensor so far (the source expert's, or an earlier operator's result); same
                dtype as the source.
            logical_key: ``noise.FC1_KEY`` or ``noise.FC2_KEY``.
            target_layer: the layer index in the grown model.
            target_expert: the expert index in the grown model.
            std: the canonical std of the source tensor (``expert_noise_std``).
            full_shape: the full per-expert shape; ``value`` may be only ``region`` of it.
            region: a tuple of slices into ``full_shape``.

        Returns:
            The new value (``value`` itself when unchanged).
        """
        return value

    def router(self, plan: GrowthPlan, target_layer: int, grown_EH: torch.Tensor,
               source_EH: torch.Tensor) -> torch.Tensor:
        """The router weight ``[E_tgt, H]`` after this operator.

        Args:
            plan: the plan this operator is part of.
            target_layer: the layer index in the grown model.
            grown_EH: the rows gathered through ``plan.expert_source`` (a fresh tensor; may be changed).
            source_EH: the source layer's router weight ``[E_src, H]``.

        Returns:
            The new value.
        """
        return grown_EH

    def expert_bias(self, plan: GrowthPlan, target_layer: int, grown_E: torch.Tensor,
                    source_E: torch.Tensor) -> torch.Tensor:
        """The router ``expert_bias`` ``[E_tgt]`` after this operator.

        Args:
            plan: the plan this operator is part of.
            target_layer: the layer index in the grown model.
            grown_E: the entries gathered through ``plan.expert_source`` (a fresh tensor; may be changed).
            source_E: the source layer's expert bias ``[E_src]``.

        Returns:
            The new value.
        """
        return grown_E

    def needs_expert_stats(self) -> bool:
        """Whether ``expert_tensor`` needs the std of the source expert tensors (a statistics pass).

        Returns:
            True to have the engine compute them (``source_reads.expert_stds``) before any tensor is grown.
        """
        return False

    def expert_noise_std(self, moments_by_expert: Sequence[Moments], source_expert: int) -> float | None:
        """The std ``expert_tensor`` is given for ``source_expert``.

        Args:
            moments_by_expert: the moments of each source expert's tensor (one layer, one logical key).
            source_expert: the source expert.

        Returns:
            The std, or None for the default (that expert's own, ``noise.canonical_std``-rounded).
        """
        return None

    # ---- optimizer state ----------------------------------------------------------------------

    def carry_problem(self, optimizer: str) -> str | None:
        """Why ``growth.optimizer: <optimizer>`` cannot carry Adam state through this operator.

        Args:
            optimizer: ``carry`` or ``carry_zero_new``.

        Returns:
            One line naming the keys involved, or None when the carry is possible.
        """
        return None

    # ---- records ------------------------------------------------------------------------------

    @classmethod
    def describe(cls, section: dict) -> str:
        """One phrase for a growth record's section of this operator (``megatron-grow inspect``).

        Args:
            section: the operator's section as the growth record stores it (``dataclasses.asdict``).

        Returns:
            The phrase.
        """
        return f"{cls.name} " + ", ".join(f"{k}={v}" for k, v in section.items())


@dataclass(frozen=True)
class GrowthPlan:
    """Everything needed to produce target tensors from source tensors.

    ``operators``: the bound operators in the order applied (``order`` holds their names).
    ``layer_source[j]``: source layer of target layer ``j``; ``layer_is_new_copy[j]``: the target
    layer is a copy (not the first occurrence of its source layer). ``expert_source[j][e]``: source
    expert (of source layer ``layer_source[j]``) of target expert ``e`` in target layer ``j``;
    ``expert_copy_index[j][e]``: 0 for the original, 1, 2, ... for copies. Per target layer because
    an operator may map each layer's experts differently (upcycling by each layer's utility); a
    depth copy of a layer carries that layer's map. Identity maps when no operator changes that
    axis. ``layers_after[k][j]``: the index of target layer ``j`` in the output of operator ``k``
    (what keys per-layer noise).
    """

    source: ModelConfig
    target: ModelConfig
    growth: GrowthConfig
    order: tuple[str, ...]
    operators: tuple[GrowthOperator, ...]
    layer_source: tuple[int, ...]
    layer_is_new_copy: tuple[bool, ...]
    expert_source: tuple[tuple[int, ...], ...]
    expert_copy_index: tuple[tuple[int, ...], ...]
    layers_after: tuple[tuple[int, ...], ...]

    def layer_index_after(self, operator: str, target_layer: int) -> int:
        """The index of ``target_layer`` in the model that operator ``operator`` produced.

        An operator that keys noise by layer uses it: with depth then width, width acts on the deep
        model, so every depth copy is noised on its own (the target layer); with width then depth,
        a layer is noised once and then copied (its source layer).

        Args:
            operator: an operator name in ``self.order``.
            target_layer: a layer index in the grown model.

        Returns:
            The layer index in that operator's output.
        """
        if not 0 <= target_layer < len(self.layer_source):
            raise IndexError(f"target layer {target_layer} out of range [0, {len(self.layer_source)})")
        return self.layers_after[self.order.index(operator)][target_layer]

    def is_original_expert(self, target_layer: int, target_expert: int) -> bool:
        """True for a target expert that is the first occurrence of its source expert in its layer.

        Args:
            target_layer: a layer index in the grown model.
            target_expert: an expert index in the grown model.

        Returns:
            Whether its copy index is 0.
        """
        return self.expert_copy_index[target_layer][target_expert] == 0

    def counts(self) -> dict[str, tuple[int, int]]:
        """Before/after sizes (parameters are counted in ``models.params``).

        Returns:
            ``{name: (source, target)}`` for layers, experts per layer, top-k and experts in total.
        """
        s, t = self.source, self.target
        return {
            "num_layers": (s.num_layers, t.num_layers),
            "num_moe_experts": (s.num_moe_experts, t.num_moe_experts),
            "moe_router_topk": (s.moe_router_topk, t.moe_router_topk),
            "experts_total": (s.num_layers * s.num_moe_experts, t.num_layers * t.num_moe_experts),
        }
