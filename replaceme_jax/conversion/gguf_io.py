"""GGUF (llama.cpp) files: dequantise with the `gguf` package, undo llama.cpp's Q/K permutation.

The config and tokenizer are rebuilt from the GGUF metadata by `transformers`, so that an export of
a GGUF input is a complete HF directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from replaceme_jax.conversion.maps import GGUF_NAME_MAPS, WEIGHT_MAPS
from replaceme_jax.conversion.model_io import LoadedModel, ParamFiller, PlaceFn, default_place, parse_dtype
from replaceme_jax.conversion.weight_map import hf_key_to_param
from replaceme_jax.errors import CheckpointError, UnsupportedModelError
from replaceme_jax.models import family_for

log = logging.getLogger(__name__)

# Architectures whose Q/K rows llama.cpp's converter permuted for its interleaved rope.
_PERMUTED_QK_ARCHS = ("llama", "mistral")


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


def _arch(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError("GGUF file has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def _metadata(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


# Routing that llama.cpp hard-codes per architecture (not stored in the file): whether the top-k gates
# are renormalised. Mixtral (arch "llama" with experts) and Qwen3-MoE do; Qwen2-MoE does not.
_GGUF_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}


def _moe_fields(reader, arch: str, cfg: dict) -> dict:
    """The MoE sizes transformers' GGUF config reader leaves out or gets wrong, from the metadata."""
    experts = _metadata(reader, f"{arch}.expert_count")
    if not experts:
        return cfg
    cfg = dict(cfg)
    expert_size = _metadata(reader, f"{arch}.expert_feed_forward_length")
    used = _metadata(reader, f"{arch}.expert_used_count")
    if arch == "llama":  # llama.cpp's spelling of a Mixtral model
        for key in ("mlp_bias", "pretraining_tp"):
            cfg.pop(key, None)
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=int(experts),
                   intermediate_size=int(expert_size or cfg["intermediate_size"]))
        cfg.pop("num_experts", None)
    else:
        cfg["num_experts"] = int(experts)
        if expert_size:
            cfg["moe_intermediate_size"] = int(expert_size)
        shared = _metadata(reader, f"{arch}.expert_shared_feed_forward_length")
        if shared is not None:
            cfg["shared_expert_intermediate_size"] = int(shared)
        cfg["norm_topk_prob"] = _GGUF_NORM_TOPK[arch]
    if used:
        cfg["num_experts_per_tok"] = int(used)
    return cfg


def gguf_hf_config(path: Path, reader) -> dict:
    """config.json dict that transformers derives from the GGUF metadata (MoE sizes from the metadata)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as e:
        raise UnsupportedModelError(f"{path}: transformers cannot read this GGUF's metadata ({e})") from None
    d = cfg.to_dict()
    d.pop("_name_or_path", None)
    d.pop("_model_name_or_path", None)
    d["architectures"] = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return _moe_fields(reader, _arch(reader), d)


def load_gguf(src, dtype: str | None = None, place: PlaceFn = default_place) -> LoadedModel:
    import gguf

    path = Path(src)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read GGUF ({e})") from None
    arch = _arch(reader)
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
            return w

        filler.add(hf_key, load)
    params = filler.finish()
    return LoadedModel(config=config, params=params, hf_config=hf_config, source=str(path), source_format="gguf",
                       dtype=target, source_dtype="float32", tokenizer_source=str(path))
