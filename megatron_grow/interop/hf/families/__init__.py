"""The supported ``transformers`` classes, by their ``architectures`` name."""

from __future__ import annotations

from megatron_grow.config.schema import ModelConfig
from megatron_grow.errors import InteropError
from megatron_grow.interop.hf.families import deepseek_v3, glm4_moe, mixtral, olmoe, qwen2_moe, qwen3_moe
from megatron_grow.interop.hf.families.base import Family

# Export tries these in order when the checkpoint does not say which class it came from.
FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    qwen3_moe.FAMILY, mixtral.FAMILY, olmoe.FAMILY, qwen2_moe.FAMILY, glm4_moe.FAMILY, deepseek_v3.FAMILY)}


def family_for_hf_config(hf: dict, where: str) -> Family:
    """The family of an HF ``config.json``: by ``architectures``, else by ``model_type``.

    Args:
        hf: the ``config.json`` dict.
        where: the file, named in the refusal.

    Returns:
        The :class:`Family`.

    Raises:
        InteropError: no supported class matches (the message lists the supported ones).
    """
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    for fam in FAMILIES.values():
        if hf.get("model_type") == fam.model_type:
            return fam
    raise InteropError(f"{where}: unknown architecture {archs or hf.get('model_type')!r}; supported: "
                       f"{', '.join(FAMILIES)}")


def family_by_name(name: str) -> Family:
    """The family of a class name (``--architecture``).

    Args:
        name: e.g. ``Qwen3MoeForCausalLM``.

    Returns:
        The :class:`Family`.

    Raises:
        InteropError: an unsupported name (the message lists the supported ones).
    """
    if name not in FAMILIES:
        raise InteropError(f"unknown architecture {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_model(model: ModelConfig, preferred: str | None = None) -> tuple[Family, dict]:
    """The first class (``preferred`` first) that holds ``model`` exactly, with its HF config fields.

    Args:
        model: the model to export.
        preferred: the class to try first (e.g. the one the model was imported from).

    Returns:
        ``(family, hf config fields)``.

    Raises:
        InteropError: no class holds the model; the message gives each class's reason.
    """
    order = ([FAMILIES[preferred]] if preferred in FAMILIES else []) + \
        [f for f in FAMILIES.values() if f.architecture != preferred]
    reasons = []
    for fam in order:
        try:
            return fam, fam.write_config(model)
        except InteropError as e:
            reasons.append(str(e))
    raise InteropError("no supported Hugging Face class represents this model exactly: " + "; ".join(reasons))
