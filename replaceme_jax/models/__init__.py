"""Model families: one module each, providing the contract of ``models/base.py`` (config parsing,
parameter specs with logical axes, the one layer function, the fold of T); none knows any file format."""

from __future__ import annotations

from types import ModuleType

from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import gemma, llama, moe
from replaceme_jax.models.base import check_family

# one line per family (models/base.py says what a family module provides)
FAMILIES: dict[str, ModuleType] = {t: check_family(family) for family in (llama, moe, gemma) for t in family.MODEL_TYPES}


def family_for(model_type: str | None) -> ModuleType:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def config_from_hf(hf_config: dict):
    return family_for(hf_config.get("model_type")).config_from_hf(hf_config)
