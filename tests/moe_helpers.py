"""Tiny random mixture-of-experts `transformers` models (no hub, no files shipped)."""

from __future__ import annotations

MOE_CONFIGS = {
    # name: (model_type, overrides)
    "mixtral": ("mixtral", dict(num_local_experts=6, num_experts_per_tok=2)),
    "mixtral_sliding_tied": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                             tie_word_embeddings=True)),
    "qwen2_moe_shared": ("qwen2_moe", dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                                           shared_expert_intermediate_size=24)),
    "qwen2_moe_norm_topk": ("qwen2_moe", dict(num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
                                              shared_expert_intermediate_size=8, qkv_bias=False)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    "olmoe": ("olmoe", dict(num_experts=6, num_experts_per_tok=2)),
    "olmoe_clip_bias": ("olmoe", dict(num_experts=4, num_experts_per_tok=3, clip_qkv=0.6, attention_bias=True)),
}


def moe_hf_config(model_type: str, **overrides):
    import transformers

    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "olmoe": transformers.OlmoeConfig}[model_type]
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        base["moe_intermediate_size"] = 16
    base.update(overrides)
    return cls(**base)


def make_moe_model(directory, model_type: str, seed: int = 0, dtype: str = "float32", tokenizer: bool = False,
                   init_std: float = 0.2, **overrides):
    """Save a tiny random MoE model to ``directory``; return the torch model."""
    from tests.helpers import save_random_model

    return save_random_model(directory, moe_hf_config(model_type, **overrides), seed, dtype, tokenizer, init_std)
