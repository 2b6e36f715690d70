"""Weight map of the Llama family (llama, mistral, qwen2, qwen3): HF names <-> params paths."""

from replaceme_jax.conversion.weight_map import WeightRule

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")

WEIGHT_MAP = (
    WeightRule("model.embed_tokens.weight", "embed_tokens.embedding"),
    WeightRule("model.norm.weight", "norm.scale"),
    WeightRule("lm_head.weight", "lm_head.kernel", "transpose"),
    WeightRule("model.layers.{i}.{name}.weight", "layers.{i}.{name}.scale", choices=_NORMS),
    WeightRule("model.layers.{i}.self_attn.{name}.weight", "layers.{i}.self_attn.{name}.kernel", "transpose",
               choices=_PROJ),
    WeightRule("model.layers.{i}.self_attn.{name}.bias", "layers.{i}.self_attn.{name}.bias", choices=_PROJ),
    WeightRule("model.layers.{i}.self_attn.{name}.weight", "layers.{i}.self_attn.{name}.scale",
               choices=("q_norm", "k_norm")),
    WeightRule("model.layers.{i}.mlp.{name}.weight", "layers.{i}.mlp.{name}.kernel", "transpose", choices=_MLP),
    WeightRule("model.layers.{i}.mlp.{name}.bias", "layers.{i}.mlp.{name}.bias", choices=_MLP),
)

# llama.cpp tensor names -> HF names (before the weight map applies).
GGUF_NAMES = (
    WeightRule("token_embd.weight", "model.embed_tokens.weight"),
    WeightRule("output_norm.weight", "model.norm.weight"),
    WeightRule("output.weight", "lm_head.weight"),
    WeightRule("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    WeightRule("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    WeightRule("blk.{i}.attn_q.{name}", "model.layers.{i}.self_attn.q_proj.{name}", choices=("weight", "bias")),
    WeightRule("blk.{i}.attn_k.{name}", "model.layers.{i}.self_attn.k_proj.{name}", choices=("weight", "bias")),
    WeightRule("blk.{i}.attn_v.{name}", "model.layers.{i}.self_attn.v_proj.{name}", choices=("weight", "bias")),
    WeightRule("blk.{i}.attn_output.{name}", "model.layers.{i}.self_attn.o_proj.{name}", choices=("weight", "bias")),
    WeightRule("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    WeightRule("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    WeightRule("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    WeightRule("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    WeightRule("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
