"""GGUF metadata -> the HF config.json dict and the tokenizer, read with the `gguf` package.

transformers' own GGUF reader imports torch, which is only a test dependency here. This rebuilds what
`AutoConfig.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
give, from llama.cpp's key names (as transformers' `GGUF_CONFIG_MAPPING` reads them), except where
transformers is wrong for the file:
- MoE sizes come from the metadata (transformers keeps `moe_intermediate_size` and
  `shared_expert_intermediate_size` at the class defaults), and a llama file with experts is Mixtral
  (transformers reads it as a dense Llama);
- qwen3's `attention.key_length` is its `head_dim` (transformers keeps Qwen3Config's default, 128);
- Gemma 2's soft-caps come from the file (transformers keeps the class defaults); Gemma 2 / 3 get
  llama.cpp's attention scale as ``query_pre_attn_scalar`` (the head size, but hidden / heads for the
  27B models, which llama.cpp recognises by their layer count; transformers keeps 256) and Gemma 3's
  linear rope scaling of the global layers (transformers drops it);
- only the GGUF is read: transformers would also take a tokenizer.json or tokenizer_config.json
  lying in the same folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping

from replaceme_jax.errors import CheckpointError, ReplaceMeError, UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one llama.cpp architecture's metadata becomes an HF config."""

    model_type: str
    keys: Mapping[str, str]  # "<arch>.KEY" -> HF config key; a later key wins over an earlier one
    # what llama.cpp hard-codes for the architecture, so the file does not say it
    fixed: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # fields llama.cpp derives from others: (architecture, metadata, fields so far) -> more fields
    derived: Callable[[str, dict, dict], dict] | None = None
    architecture: str | None = None  # the HF class; default: the config class's name with ForCausalLM


_DENSE = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# rotate-half rope over the whole head: llama.cpp's rotary width is the head size
_LLAMA = _DENSE | {"rope.dimension_count": "head_dim"}
_EXPERTS = {
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}

_GEMMA = _DENSE | {"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"}
# llama.cpp's 27B Gemma models (by block count) scale scores by hidden / heads instead of the head size.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_derived(arch: str, metadata: dict, fields: dict) -> dict:
    out = {}
    if "head_dim" in fields:
        scalar = fields["head_dim"]
        if fields.get("num_hidden_layers") == _GEMMA_27B_LAYERS[arch]:
            scalar = fields["hidden_size"] // fields["num_attention_heads"]
        out["query_pre_attn_scalar"] = scalar
    if metadata.get(f"{arch}.rope.scaling.type") == "linear" and metadata.get(f"{arch}.rope.scaling.factor"):
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    return out


# Keyed by general.architecture. norm_topk_prob: whether llama.cpp renormalises the top-k gates.
GGUF_ARCHS = {
    "llama": GgufArch("llama", _LLAMA),
    "qwen2": GgufArch("qwen2", _DENSE),
    "qwen3": GgufArch("qwen3", _DENSE | {"attention.key_length": "head_dim"}),
    "qwen2moe": GgufArch("qwen2_moe", _DENSE | _EXPERTS, {"norm_topk_prob": False}),
    "qwen3moe": GgufArch("qwen3_moe", _DENSE | {"attention.key_length": "head_dim"} | _EXPERTS,
                         {"norm_topk_prob": True}),
    "gemma2": GgufArch("gemma2", _GEMMA | {"attn_logit_softcapping": "attn_logit_softcapping",
                                           "final_logit_softcapping": "final_logit_softcapping"},
                       derived=_gemma_derived),
    "gemma3": GgufArch("gemma3_text", _GEMMA, derived=_gemma_derived, architecture="Gemma3ForCausalLM"),
}
# llama.cpp writes these as arch "llama" too.
_MISTRAL = GgufArch("mistral", _LLAMA)
_MIXTRAL = GgufArch("mixtral", _LLAMA | {"expert_count": "num_local_experts",
                                         "expert_used_count": "num_experts_per_tok",
                                         "expert_feed_forward_length": "intermediate_size"})

# global keys every architecture reads (transformers' GGUF_CONFIG_MAPPING["tokenizer"])
_TOKEN_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# tokenizer_config names of the special tokens, and the metadata keys of their ids
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read GGUF ({e})") from None


def read_metadata(reader) -> dict:
    """Every metadata key with its value as Python (str, int, float, bool, lists of those)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def gguf_architecture(path: Path, metadata: dict) -> str:
    arch = metadata.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF file has no general.architecture")
    return arch


def _arch_entry(path: Path, metadata: dict) -> GgufArch:
    arch = gguf_architecture(path, metadata)
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r}")
    if arch == "llama" and metadata.get("llama.expert_count"):
        return _MIXTRAL
    # transformers tests `"mistral" in [general.name]`: a list, so only the exact name counts
    if arch == "llama" and metadata.get("general.name") == "mistral":
        return _MISTRAL
    return GGUF_ARCHS[arch]


def gguf_hf_config(path: Path, reader) -> dict:
    """The config.json dict for this file: transformers' GGUF fields, then its config class's defaults."""
    from transformers import AutoConfig

    metadata = read_metadata(reader)
    entry = _arch_entry(path, metadata)
    arch = metadata["general.architecture"]
    fields = {"model_type": entry.model_type, **entry.fixed}
    # llama.cpp writes the output projection only when it is not the embedding matrix
    fields["tie_word_embeddings"] = all(tensor.name != "output.weight" for tensor in reader.tensors)
    keys = {f"{arch}.{key}": name for key, name in entry.keys.items()} | _TOKEN_IDS
    fields.update({name: metadata[key] for key, name in keys.items() if key in metadata})
    if "vocab_size" not in fields and "tokenizer.ggml.tokens" in metadata:
        fields["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    if entry.derived is not None:
        fields.update(entry.derived(arch, metadata, fields))
    config = AutoConfig.for_model(**fields)
    d = config.to_dict()
    d.pop("_name_or_path", None)  # where transformers read it from, not part of the model
    d["architectures"] = [entry.architecture or type(config).__name__.replace("Config", "ForCausalLM")]
    return d


def _tokenizer_parts(metadata: dict) -> tuple[dict, dict]:
    """transformers' `get_gguf_tokenizer` on our metadata: (tokenizer_dict, tokenizer_config)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    tokenizer, config = (
        {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    )
    if tokenizer.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return tokenizer, config


def _tokenizer_class(model_type: str):
    """The class AutoTokenizer picks for a GGUF of this model type."""
    from transformers import CONFIG_MAPPING, TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    cls = TOKENIZER_MAPPING.get(CONFIG_MAPPING[model_type], TokenizersBackend)
    # the mistral-common backend is only taken for mistral-format files, which a GGUF is not
    return TokenizersBackend if cls is None or cls.__name__ == "MistralCommonBackend" else cls


def gguf_tokenizer(path: Path):
    """The tokenizer `AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)` builds, without torch."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # older transformers keep the GGUF tokenizer code elsewhere
        import transformers

        raise ReplaceMeError(f"{path}: rebuilding a GGUF tokenizer needs transformers.integrations.gguf, which "
                             f"transformers {transformers.__version__} does not have") from None

    metadata = read_metadata(open_gguf(path))
    entry = _arch_entry(path, metadata)
    if "tokenizer.ggml.tokens" not in metadata:
        raise ReplaceMeError(f"{path}: no tokenizer in the GGUF metadata")
    tokenizer_dict, tokenizer_config = _tokenizer_parts(metadata)
    try:
        backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    except ValueError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    return _tokenizer_class(entry.model_type)(tokenizer_object=backend, name_or_path=str(path.parent),
                                              **tokenizer_config, **extra)


def check_gguf_architecture(path: Path) -> None:
    """Refuse, before any long work, a GGUF file that cannot be read or whose architecture is not supported."""
    reader = open_gguf(path)
    wanted = ("general.architecture", "general.name", "llama.expert_count")
    _arch_entry(path, {key: reader.fields[key].contents() for key in wanted if key in reader.fields})
