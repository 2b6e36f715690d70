"""Model families. Each family module provides ``config_from_hf``, ``param_specs``, ``forward`` and
``decoder_layer``, the pieces a layer loop needs (``attention_context``, ``embed``, ``final_norm``,
``lm_head``, ``layer_around_attention``, ``qkv_projection``) and ``fold_output_map`` (a map on the MLP
branch written back into the weights); none of them knows any file format."""

from __future__ import annotations

from types import ModuleType

from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import gemma, llama, moe

FAMILIES: dict[str, ModuleType] = {model_type: llama for model_type in llama.MODEL_TYPES}
FAMILIES.update({model_type: moe for model_type in moe.MODEL_TYPES})
FAMILIES.update({model_type: gemma for model_type in gemma.MODEL_TYPES})


def family_for(model_type: str | None) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def config_from_hf(hf_config: dict):
    return family_for(hf_config.get("model_type")).config_from_hf(hf_config)
