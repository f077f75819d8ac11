"""Which rows of which Hugging Face tensors make up each Megatron-Core stored tensor.

Megatron-Core ``torch_dist`` checkpoints of ``GPTModel`` (local and TE specs) store per-layer
tensors stacked over layers and routed-expert tensors over layers and experts. One *item* is one
layer's (or one layer-and-expert's) slice of a stored tensor, e.g. layer 3 of
``decoder.layers.self_attention.linear_qkv.weight``. Every item is a concatenation along its
first dim of row blocks (:class:`Piece`) of HF tensors (or zero rows: MCore's vocabulary padding):

A mixed dense/MoE stack (``model.moe_layer_freq``) is stored one key per layer instead
(``decoder.layers.<i>.<name>``, experts still stacked): its items say so (``stacked=False``), and a
dense layer's items are its MLP, ``linear_fc1`` = ``[gate_proj; up_proj]`` and ``linear_fc2`` = ``down_proj``.

* ``linear_qkv`` (weight and bias): per query group ``g``, the ``heads/groups`` query heads of
  ``g`` (``q_proj`` rows), then key head ``g`` (``k_proj``), then value head ``g`` (``v_proj``);
* routed and shared expert ``linear_fc1``: ``[gate_proj; up_proj]`` (SwiGLU, gate first);
* everything else (multi-latent attention included): one HF tensor, whole.

Import fills any rectangular region of an item from HF slices; export rebuilds each HF tensor
from its rows in the items. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_grow.checkpoint import keys
from megatron_grow.config.schema import ModelConfig, is_mixed_stack, moe_layer_pattern
from megatron_grow.interop.hf.families.base import Family


@dataclass(frozen=True)
class Piece:
    """``rows`` rows of HF tensor ``hf_name`` from row ``hf_row`` on (``hf_name`` None: zero rows)."""

    hf_name: str | None
    hf_row: int
    rows: int


@dataclass(frozen=True)
class Item:
    """One layer's (or one layer-and-expert's) slice of a stored tensor, as row blocks of HF tensors."""

    key: str
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    stacked: bool = True    # False: ``key`` names its layer (a mixed dense/MoE stack), no layer axis

    @property
    def lead(self) -> tuple[int, ...]:
        """The item's indices on the stored tensor's prepended axes (layer if stacked, then expert)."""
        return tuple(d for d in (self.layer if self.stacked else None, self.expert) if d is not None)

    @property
    def group(self) -> tuple:
        """Export reads and writes one group at a time: the non-layer tensors, a layer, or one expert."""
        return (self.layer if self.layer is not None else -1, self.expert if self.expert is not None else -1)


def _whole(name: str, rows: int) -> tuple[Piece, ...]:
    return (Piece(name, 0, rows),)


def _qkv_pieces(prefix: str, suffix: str, model: ModelConfig) -> tuple[Piece, ...]:
    d, groups = model.kv_channels, model.num_query_groups
    per_group = model.num_attention_heads // groups
    out = []
    for g in range(groups):
        out += [Piece(f"{prefix}q_proj.{suffix}", g * per_group * d, per_group * d),
                Piece(f"{prefix}k_proj.{suffix}", g * d, d), Piece(f"{prefix}v_proj.{suffix}", g * d, d)]
    return tuple(out)


def _layer_item(model: ModelConfig, key: str, layer: int, expert: int | None, shape: tuple, pieces: tuple) -> Item:
    """An item of stacked storage key ``key``; a mixed stack stores it one key per layer instead
    (``checkpoint.keys.per_layer_storage_key``)."""
    if not is_mixed_stack(model):
        return Item(key, layer, expert, shape, pieces)
    return Item(keys.per_layer_storage_key(layer, key[len(keys.LAYER_PREFIX):]), layer, expert, shape, pieces, False)


def _attention_items(model: ModelConfig, layer: int) -> list[Item]:
    """Input norm and GQA attention (Llama-style ``q_proj``/``k_proj``/``v_proj``/``o_proj``, optional norms)."""
    H, d = model.hidden_size, model.kv_channels
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    p = f"model.layers.{layer}."
    att = p + "self_attn."

    def item(key: str, shape: tuple, pieces: tuple) -> Item:
        return _layer_item(model, key, layer, None, shape, pieces)

    items = [item(keys.INPUT_NORM, (H,), _whole(p + "input_layernorm.weight", H)),
             item(keys.QKV, (q + 2 * kv, H), _qkv_pieces(att, "weight", model))]
    if model.add_qkv_bias:
        items.append(item(keys.QKV_BIAS, (q + 2 * kv,), _qkv_pieces(att, "bias", model)))
    items.append(item(keys.PROJ, (H, q), _whole(att + "o_proj.weight", H)))
    if model.qk_layernorm:
        qn, kn = (q, kv) if model.qk_layernorm_across_heads else (d, d)  # OLMoE: one norm over all heads
        items += [item(keys.Q_NORM, (qn,), _whole(att + "q_norm.weight", qn)),
                  item(keys.K_NORM, (kn,), _whole(att + "k_norm.weight", kn))]
    return items


def _mla_items(model: ModelConfig, layer: int) -> list[Item]:
    """Input norm and multi-latent attention (DeepSeek names): one HF tensor per MCore tensor, same rows
    (both keep the query's per-head [no-RoPE; RoPE] rows, and the key/value down projection's [latent;
    RoPE key] rows; the RoPE rows are in DeepSeek's interleaved order, which MCore's MLA expects)."""
    H, n, r_q, r_kv = model.hidden_size, model.num_attention_heads, model.q_lora_rank, model.kv_lora_rank
    qk = n * (model.qk_head_dim + model.qk_pos_emb_head_dim)
    p = f"model.layers.{layer}."
    att = p + "self_attn."

    def item(key: str, shape: tuple, pieces: tuple) -> Item:
        return _layer_item(model, key, layer, None, shape, pieces)

    items = [item(keys.MLA_INPUT_NORM, (H,), _whole(p + "input_layernorm.weight", H))]
    if r_q:
        items += [item(keys.MLA_Q_DOWN, (r_q, H), _whole(att + "q_a_proj.weight", r_q)),
                  item(keys.MLA_Q_UP, (qk, r_q), _whole(att + "q_b_proj.weight", qk))]
        if model.qk_layernorm:
            items.append(item(keys.MLA_Q_LATENT_NORM, (r_q,), _whole(att + "q_a_layernorm.weight", r_q)))
    else:
        items.append(item(keys.MLA_Q_PROJ, (qk, H), _whole(att + "q_proj.weight", qk)))
    kv_down, kv_up = r_kv + model.qk_pos_emb_head_dim, n * (model.qk_head_dim + model.v_head_dim)
    items += [item(keys.MLA_KV_DOWN, (kv_down, H), _whole(att + "kv_a_proj_with_mqa.weight", kv_down)),
              item(keys.MLA_KV_UP, (kv_up, r_kv), _whole(att + "kv_b_proj.weight", kv_up)),
              item(keys.PROJ, (H, n * model.v_head_dim), _whole(att + "o_proj.weight", H))]
    if model.qk_layernorm:
        items.append(item(keys.MLA_KV_LATENT_NORM, (r_kv,), _whole(att + "kv_a_layernorm.weight", r_kv)))
    return items


def layer_items(model: ModelConfig, family: Family, layer: int) -> list[Item]:
    """One layer's items: attention (GQA or multi-latent) and norms, then a dense MLP, or router, shared
    expert and each routed expert.

    Args:
        model: the architecture.
        family: the HF class (its on-disk names).
        layer: the 0-based layer index.

    Returns:
        The items, in that order.
    """
    H, p = model.hidden_size, f"model.layers.{layer}."

    def item(key: str, shape: tuple, pieces: tuple) -> Item:
        return _layer_item(model, key, layer, None, shape, pieces)

    items = _mla_items(model, layer) if model.multi_latent_attention else _attention_items(model, layer)
    items.append(item(keys.LOCAL_PRE_MLP_NORM, (H,), _whole(p + "post_attention_layernorm.weight", H)))
    if not moe_layer_pattern(model)[layer]:
        D, mp = model.ffn_hidden_size or model.moe_ffn_hidden_size, f"{p}{family.naming.dense_mlp}."
        return items + [item(keys.LAYER_PREFIX + keys.DENSE_FC1_SUFFIX, (2 * D, H),
                             (Piece(mp + "gate_proj.weight", 0, D), Piece(mp + "up_proj.weight", 0, D))),
                        item(keys.LAYER_PREFIX + keys.DENSE_FC2_SUFFIX, (H, D), _whole(mp + "down_proj.weight", H))]
    return items + _moe_items(model, family, layer)


def _moe_items(model: ModelConfig, family: Family, layer: int) -> list[Item]:
    """An MoE layer's router (and expert bias), shared expert and routed experts."""
    n, H, p = family.naming, model.hidden_size, f"model.layers.{layer}."
    E, F = model.num_moe_experts, model.moe_ffn_hidden_size

    def item(key: str, shape: tuple, pieces: tuple, expert: int | None = None) -> Item:
        return _layer_item(model, key, layer, expert, shape, pieces)

    items = [item(keys.ROUTER, (E, H), _whole(f"{p}{n.moe_block}.gate.weight", E))]
    if model.moe_router_enable_expert_bias:
        items.append(item(keys.EXPERT_BIAS, (E,), _whole(p + n.router_bias, E) if n.router_bias else ()))
    S = model.moe_shared_expert_intermediate_size
    if S:
        sp = f"{p}{n.shared_expert}."
        items += [item(keys.SHARED_FC1, (2 * S, H), (Piece(sp + "gate_proj.weight", 0, S),
                                                     Piece(sp + "up_proj.weight", 0, S))),
                  item(keys.SHARED_FC2, (H, S), _whole(sp + "down_proj.weight", H))]
        if model.moe_shared_expert_gate:
            items.append(item(keys.SHARED_GATE, (1, H), _whole(p + n.shared_expert_gate, 1)))
    gate, up, down = n.expert_proj
    for e in range(E):
        ep = f"{p}{n.moe_block}.experts.{e}."
        items += [item(keys.EXPERT_FC1, (2 * F, H), (Piece(ep + f"{gate}.weight", 0, F),
                                                     Piece(ep + f"{up}.weight", 0, F)), e),
                  item(keys.EXPERT_FC2, (H, F), _whole(ep + f"{down}.weight", H), e)]
    return items


def vocab_items(model: ModelConfig, padded_vocab: int) -> tuple[list[Item], list[Item]]:
    """(first, last) non-layer items; rows past the real vocabulary are MCore padding (zeros).

    Args:
        model: the architecture.
        padded_vocab: MCore's padded vocabulary size.

    Returns:
        ``([embedding], [final norm, output layer])``.
    """
    H, V = model.hidden_size, model.vocab_size

    def padded(name: str) -> tuple[Piece, ...]:
        return (Piece(name, 0, V),) + ((Piece(None, 0, padded_vocab - V),) if padded_vocab > V else ())

    first = [Item(keys.EMBEDDING, None, None, (padded_vocab, H), padded("model.embed_tokens.weight"))]
    last = [Item(keys.FINAL_NORM, None, None, (H,), _whole("model.norm.weight", H))]
    # Tied weights: MCore's output layer (on the last pipeline stage) holds a copy of the embedding.
    head = "lm_head.weight" if model.untie_embeddings_and_output_weights else "model.embed_tokens.weight"
    last.append(Item(keys.OUTPUT_LAYER, None, None, (padded_vocab, H), padded(head)))
    return first, last


def all_items(model: ModelConfig, family: Family, padded_vocab: int) -> list[Item]:
    """Every item of the model, in checkpoint order.

    Args:
        model: the architecture.
        family: the HF class.
        padded_vocab: MCore's padded vocabulary size.

    Returns:
        The embedding, each layer's items, then the final norm and the output layer.
    """
    first, last = vocab_items(model, padded_vocab)
    out = list(first)
    for layer in range(model.num_layers):
        out += layer_items(model, family, layer)
    return out + last


def hf_tensor_shapes(items: list[Item]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the items read, with its shape (rows summed over its pieces).

    Args:
        items: items of :func:`all_items`.

    Returns:
        ``{HF tensor name: shape}``.
    """
    rows: dict[str, int] = {}
    trailing: dict[str, tuple] = {}
    for it in items:
        for pc in it.pieces:
            if pc.hf_name is None:
                continue
            rows[pc.hf_name] = max(rows.get(pc.hf_name, 0), pc.hf_row + pc.rows)
            trailing[pc.hf_name] = it.shape[1:]
    return {name: (rows[name],) + trailing[name] for name in rows}


def hf_sources(items: list[Item]) -> dict[str, list[tuple[int, Item, int, int]]]:
    """Inverse map for export: HF name -> [(hf_row, item, item_row, rows)] sorted by hf_row.

    An HF tensor read by two items (tied embedding and output layer) is sourced from the first.

    Args:
        items: items of :func:`all_items`.

    Returns:
        ``{HF tensor name: [(hf_row, item, item_row, rows)]}``.
    """
    out: dict[str, list] = {}
    owner: dict[str, tuple] = {}
    for it in items:
        row = 0
        for pc in it.pieces:
            if pc.hf_name is not None and owner.setdefault(pc.hf_name, (it.key, it.group)) == (it.key, it.group):
                out.setdefault(pc.hf_name, []).append((pc.hf_row, it, row, pc.rows))
            row += pc.rows
    for name in out:
        out[name].sort(key=lambda t: t[0])
    return out


def nbytes(shape: tuple[int, ...], element_size: int) -> int:
    """The bytes of a tensor of ``shape``.

    Args:
        shape: the tensor's shape.
        element_size: bytes per element.

    Returns:
        ``prod(shape) * element_size``.
    """
    return math.prod(shape) * element_size
