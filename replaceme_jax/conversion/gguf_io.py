"""GGUF (llama.cpp) files: dequantise with the `gguf` package, undo llama.cpp's Q/K permutation and
Gemma's ``1 + w`` norm weights.

The config and tokenizer are rebuilt from the GGUF metadata (`gguf_metadata`, no torch), so that an
export of a GGUF input is a complete HF directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from replaceme_jax.conversion.gguf_metadata import gguf_architecture, gguf_hf_config, open_gguf, read_metadata
from replaceme_jax.conversion.maps import GGUF_NAME_MAPS, WEIGHT_MAPS
from replaceme_jax.conversion.core import LoadedModel, ParamFiller, PlaceFn, default_place, parse_dtype
from replaceme_jax.conversion.weight_map import hf_key_to_param
from replaceme_jax.errors import CheckpointError, UnsupportedModelError
from replaceme_jax.models import family_for

log = logging.getLogger(__name__)

# Architectures whose Q/K rows llama.cpp's converter permuted for its interleaved rope.
_PERMUTED_QK_ARCHS = ("llama", "mistral")
# Architectures whose RMSNorm weights llama.cpp stores as 1 + w (HF keeps w; the model computes 1 + w).
_OFFSET_NORM_ARCHS = ("gemma2", "gemma3")


def undo_qk_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for rotate-half rope (rows = n_heads * head_dim)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def apply_qk_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does (used to write GGUF files in tests)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def load_gguf(src, dtype: str | None = None, place: PlaceFn = default_place) -> LoadedModel:
    import gguf

    path = Path(src)
    reader = open_gguf(path)
    arch = gguf_architecture(path, read_metadata(reader))
    if arch not in GGUF_NAME_MAPS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r}")
    hf_config = gguf_hf_config(path, reader)
    config = family_for(hf_config.get("model_type")).config_from_hf(hf_config)
    # Dequantised weights are float32; keep that unless asked otherwise.
    target = dtype or "float32"
    filler = ParamFiller(config, WEIGHT_MAPS[config.model_type], parse_dtype(target), place, str(path))
    names = GGUF_NAME_MAPS[arch]
    for tensor in reader.tensors:
        found = hf_key_to_param(names, tensor.name)
        if found is None:
            if tensor.name == "rope_freqs.weight":
                raise UnsupportedModelError(f"{path}: GGUF rope_freqs (rope scaling factors) are not supported")
            raise CheckpointError(f"{path}: unexpected GGUF tensor {tensor.name!r}")
        _, hf_key = found

        def load(tensor=tensor, hf_key=hf_key):
            shape = tuple(int(d) for d in reversed(tensor.shape))
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
            if arch in _PERMUTED_QK_ARCHS and hf_key.endswith(("q_proj.weight", "q_proj.bias")):
                w = undo_qk_permutation(w, config.num_attention_heads)
            elif arch in _PERMUTED_QK_ARCHS and hf_key.endswith(("k_proj.weight", "k_proj.bias")):
                w = undo_qk_permutation(w, config.num_key_value_heads)
            elif arch in _OFFSET_NORM_ARCHS and hf_key.endswith("norm.weight"):
                w = w - np.float32(1.0)
            return w

        filler.add(hf_key, load)
    params = filler.finish()
    return LoadedModel(config=config, params=params, hf_config=hf_config, source=str(path), source_format="gguf",
                       dtype=target, source_dtype="float32", tokenizer_source=str(path))
