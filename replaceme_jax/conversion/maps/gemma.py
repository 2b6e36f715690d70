"""Weight map of the Gemma 2 / Gemma 3 text decoders: HF names <-> params paths, and llama.cpp's names.

Norm weights are HF's zero-centred ``w`` (the model computes ``1 + w``); llama.cpp stores ``1 + w``,
which ``gguf_io`` undoes. llama.cpp does not permute Gemma's Q/K rows.
"""

from replaceme_jax.conversion.maps import llama
from replaceme_jax.conversion.weight_map import WeightRule

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

WEIGHT_MAP = tuple(
    WeightRule(rule.hf_key, rule.param_path, choices=_NORMS) if rule.choices == llama._NORMS else rule
    for rule in llama.WEIGHT_MAP
)

# llama.cpp's ffn_norm is Gemma's pre-feedforward norm; the other two norms have names of their own.
GGUF_NAMES = tuple(rule for rule in llama.GGUF_NAMES if "ffn_norm" not in rule.hf_key) + (
    WeightRule("blk.{i}.post_attention_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    WeightRule("blk.{i}.ffn_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
    WeightRule("blk.{i}.post_ffw_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
)
