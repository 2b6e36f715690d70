"""The Llama family of pre-norm decoders: `llama`, `mistral`, `qwen2`, `qwen3`.

Parameters are a plain pytree (nested dicts, ``layers`` a Python list) in HF's layout: rotate-half
rope, unscaled q, HF head order, kernels ``[in, out]``. Dropping a block of layers is a list slice and
folding a matrix into ``down_proj`` replaces one array. Names mirror HF module names so that the
weight map in ``replaceme_jax/conversion/`` stays a short table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import attention
from replaceme_jax.models.common import (
    SUPPORTED_ROPE_TYPES,
    HostRewrite,
    ParamSpec,
    Params,
    apply_rotary,
    host_rewrite,
    rms_norm,
    rope_inverse_frequencies,
    rotary_cos_sin,
)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# HF config fields that are bookkeeping only; they do not change the forward pass.
_IGNORED_FIELDS = {
    "architectures", "transformers_version", "output_hidden_states", "output_attentions", "return_dict",
    "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "id2label",
    "label2id", "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "pretraining_tp", "attention_dropout", "_name_or_path", "model_type", "tie_word_embeddings",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types", "_attn_implementation_autoset",
    "attn_implementation", "_attn_implementation", "tokenizer_class", "use_return_dict",
    "torchscript", "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size", "add_cross_attention",
    "finetuning_task", "decoder_start_token_id", "sep_token_id", "prefix", "task_specific_params",
    "is_decoder", "tie_encoder_decoder", "bad_words_ids", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "do_sample", "max_length",
    "min_length", "early_stopping", "length_penalty", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "encoder_no_repeat_ngram_size", "use_bfloat16", "quantization_config",
    "tf32", "unk_token_id", "_model_name_or_path", "mlp_only_layers", "_commit_hash",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    max_position_embeddings: int = 2048
    # not a checkpoint field: which attention runs (models/attention.py; "auto" = fused on GPU in bf16)
    attention_implementation: str = "auto"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedModelError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )

    @property
    def inv_freq(self) -> np.ndarray:
        return rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_type, dict(self.rope_params))

    def inv_freq_of_layer(self, layer: int) -> np.ndarray:
        """Rope frequencies of one layer (one table for every layer here; Gemma 3 has two)."""
        return self.inv_freq

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def attention_softcap(self) -> float | None:
        """``cap * tanh(scores / cap)`` on the attention scores before the mask (Gemma 2); None: none."""
        return None

    def window_of_layer(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    def with_layers(self, kept: Sequence[int]) -> "LlamaConfig":
        """The config after keeping only the given original layer indices (in order)."""
        return dataclasses.replace(
            self, num_hidden_layers=len(kept), layer_types=tuple(self.layer_types[i] for i in kept)
        )


def _rope_from_hf(cfg: dict) -> tuple[float, str, dict]:
    # transformers 5 spells it rope_parameters (with rope_theta inside); 4.x uses rope_theta + rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported")
    needed = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in needed[rope_type]:
        if key not in rope:
            raise UnsupportedModelError(f"rope scaling {rope_type!r} is missing field {key!r}")
    if rope_type == "default":
        rope = {}
    else:
        unknown = set(rope) - set(needed[rope_type]) - {"attention_factor"}
        if unknown:
            raise UnsupportedModelError(f"unsupported rope scaling fields for {rope_type!r}: {sorted(unknown)}")
        if rope.get("attention_factor") not in (None, 1, 1.0):
            raise UnsupportedModelError("rope attention_factor other than 1 is not supported")
        rope.pop("attention_factor", None)
    return float(theta), rope_type, rope


def check_layer_types(layer_types, sliding_window) -> None:
    """Refuse attention kinds this code does not implement, and sliding layers without a window."""
    bad = set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
    if bad:
        raise UnsupportedModelError(f"unsupported layer_types {sorted(bad)}")
    if SLIDING_ATTENTION in layer_types and not sliding_window:
        raise UnsupportedModelError("layer_types asks for sliding attention but sliding_window is not set")


def shared_config_fields(cfg: dict, rope: tuple, *, intermediate_size: int, tie_word_embeddings: bool,
                         max_position_embeddings: int) -> dict:
    """The config fields every family reads from ``config.json`` the same way; ``rope`` is
    ``_rope_from_hf``'s triple and the keyword arguments are the family's own value or default."""
    theta, rope_type, rope_params = rope
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=intermediate_size,
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=tuple(sorted((k, float(v)) for k, v in rope_params.items())),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_word_embeddings)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", max_position_embeddings)),
    )


def config_from_hf(cfg: dict) -> LlamaConfig:
    """Parse an HF ``config.json`` dict, refusing anything this implementation would get wrong."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    unknown = sorted(k for k in cfg if k not in _IGNORED_FIELDS)
    if unknown:
        raise UnsupportedModelError(f"unsupported config field(s) for {model_type}: {', '.join(unknown)}")
    if cfg.get("mlp_only_layers"):
        raise UnsupportedModelError("mlp_only_layers is not supported")
    rope = _rope_from_hf(cfg)
    n_layers = int(cfg["num_hidden_layers"])

    sliding_window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if model_type == "mistral":
        kinds = [SLIDING_ATTENTION if sliding_window is not None else FULL_ATTENTION] * n_layers
        if layer_types is not None and list(layer_types) != kinds:
            raise UnsupportedModelError("mistral with per-layer layer_types is not supported")
        layer_types = kinds
    elif model_type in ("qwen2", "qwen3"):
        if layer_types is None:
            use_sw = bool(cfg.get("use_sliding_window", False))
            max_window_layers = cfg.get("max_window_layers", n_layers)
            layer_types = [
                SLIDING_ATTENTION if use_sw and sliding_window is not None and i >= max_window_layers
                else FULL_ATTENTION for i in range(n_layers)
            ]
    else:  # llama
        if sliding_window is not None:
            raise UnsupportedModelError("sliding_window is not supported for llama")
        layer_types = layer_types or [FULL_ATTENTION] * n_layers
    check_layer_types(layer_types, sliding_window)

    attention_bias = bool(cfg.get("attention_bias", False))
    return LlamaConfig(
        **shared_config_fields(cfg, rope, intermediate_size=int(cfg["intermediate_size"]), tie_word_embeddings=False,
                               max_position_embeddings=2048),
        model_type=model_type,
        qkv_bias=True if model_type == "qwen2" else (attention_bias if model_type in ("llama", "qwen3") else False),
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_window=int(sliding_window) if sliding_window is not None else None,
        layer_types=tuple(layer_types),
    )


def config_to_hf_updates(config: LlamaConfig) -> dict:
    """Per-layer and size fields to write into an exported ``config.json``."""
    updates: dict[str, Any] = {"num_hidden_layers": config.num_hidden_layers}
    if config.model_type in ("qwen2", "qwen3"):
        updates["layer_types"] = list(config.layer_types)
        # max_window_layers indexes layers; after removing layers it is only meaningful if kept consistent.
        sliding = [i for i, t in enumerate(config.layer_types) if t == SLIDING_ATTENTION]
        updates["max_window_layers"] = sliding[0] if sliding else config.num_hidden_layers
    return updates


# ---------------------------------------------------------------------------------------------
# Parameters


def _linear(d_in: int, d_out: int, axes: tuple[str, str], bias: bool) -> dict:
    spec = {"kernel": ParamSpec((d_in, d_out), axes)}
    if bias:
        spec["bias"] = ParamSpec((d_out,), (axes[1],), init="zeros")
    return spec


def _norm(dim: int, axis: str = "norm") -> dict:
    return {"scale": ParamSpec((dim,), (axis,), init="ones")}


def layer_specs(c: LlamaConfig) -> dict:
    d, i = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = {
        "q_proj": _linear(d, q_dim, ("embed", "q_heads"), c.qkv_bias),
        "k_proj": _linear(d, kv_dim, ("embed", "kv_heads"), c.qkv_bias),
        "v_proj": _linear(d, kv_dim, ("embed", "kv_heads"), c.qkv_bias),
        "o_proj": _linear(q_dim, d, ("q_heads", "embed"), c.o_bias),
    }
    if c.qk_norm:
        attn["q_norm"] = _norm(c.head_dim, "head_dim")
        attn["k_norm"] = _norm(c.head_dim, "head_dim")
    return {
        "input_layernorm": _norm(d),
        "self_attn": attn,
        "post_attention_layernorm": _norm(d),
        "mlp": {
            "gate_proj": _linear(d, i, ("embed", "mlp"), c.mlp_bias),
            "up_proj": _linear(d, i, ("embed", "mlp"), c.mlp_bias),
            "down_proj": _linear(i, d, ("mlp", "embed"), c.mlp_bias),
        },
    }


def param_specs(c: LlamaConfig) -> dict:
    specs = {
        "embed_tokens": {"embedding": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"))},
        "layers": [layer_specs(c) for _ in range(c.num_hidden_layers)],
        "norm": _norm(c.hidden_size),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((c.hidden_size, c.vocab_size), ("embed", "vocab"))}
    return specs


# ---------------------------------------------------------------------------------------------
# Forward


def _dense(p: dict, x: jax.Array) -> jax.Array:
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"]
    return y


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """Everything a layer needs besides its weights and the hidden state; built once per batch."""

    cos: jax.Array
    sin: jax.Array
    key_valid: jax.Array  # [B, S] bool
    positions: jax.Array  # [B, S] int
    whole_sequence: bool = False  # positions are 0..S-1 (the plain forward): a fused kernel may run


def attention_context(c: LlamaConfig, input_shape, attention_mask=None, positions=None) -> AttentionContext:
    b, s = input_shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), jnp.int32)
    whole_sequence = positions is None
    if positions is None:
        # transformers' plain forward numbers positions 0..S-1 whatever the padding (right padding is exact).
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    cos, sin = rotary_cos_sin(positions, c.inv_freq)
    return AttentionContext(cos=cos, sin=sin, key_valid=attention_mask.astype(bool), positions=positions,
                            whole_sequence=whole_sequence)


def project_qkv(p: dict, c: LlamaConfig, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys, values ``[B, S, heads, hd]`` before rope (with the per-head q/k norm of qwen3)."""
    b, s, _ = x.shape
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = _dense(p["q_proj"], x).reshape(b, s, hq, hd)
    k = _dense(p["k_proj"], x).reshape(b, s, hkv, hd)
    v = _dense(p["v_proj"], x).reshape(b, s, hkv, hd)
    if c.qk_norm:
        q = rms_norm(q, p["q_norm"]["scale"], c.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["scale"], c.rms_norm_eps)
    return q, k, v


def _attention(p: dict, c: LlamaConfig, x: jax.Array, ctx: AttentionContext, window: int | None,
               project=project_qkv) -> jax.Array:
    """Causal self-attention; ``project`` gives q/k/v (a family with other q/k norms passes its own)."""
    q, k, v = project(p, c, x)
    q = apply_rotary(q, ctx.cos, ctx.sin)
    k = apply_rotary(k, ctx.cos, ctx.sin)
    out = attention.attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=c.attention_scale,
                           q_positions=ctx.positions, k_positions=ctx.positions, key_valid=ctx.key_valid,
                           window=window, logit_softcap=c.attention_softcap, whole_sequence=ctx.whole_sequence,
                           implementation=c.attention_implementation)
    return _dense(p["o_proj"], out)


def _mlp(p: dict, x: jax.Array) -> jax.Array:
    return _dense(p["down_proj"], jax.nn.silu(_dense(p["gate_proj"], x)) * _dense(p["up_proj"], x))


def qkv_projection(c: LlamaConfig):
    """The q/k/v projection of this family (what a KV-cache attention calls)."""
    return project_qkv


def layer_around_attention(layer: dict, c: LlamaConfig, layer_index: int, h: jax.Array, attend):
    """One pre-norm layer around a given attention: ``attend(attn_params, normed_h) -> (out, aux)``
    (the plain attention, or a KV-cache one). Returns ``(h_next, Y, M, aux)``."""
    attn_out, aux = attend(layer["self_attn"], rms_norm(h, layer["input_layernorm"]["scale"], c.rms_norm_eps))
    y = h + attn_out
    m = _mlp(layer["mlp"], rms_norm(y, layer["post_attention_layernorm"]["scale"], c.rms_norm_eps))
    return y + m, y, m, aux


def decoder_layer(
    layer: dict, c: LlamaConfig, layer_index: int, h: jax.Array, ctx: AttentionContext
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm layer. Returns ``(h_next, Y, M)``: output, residual after attention, MLP branch."""
    def attend(p, x):
        return _attention(p, c, x, ctx, c.window_of_layer(layer_index)), None

    h_next, y, m, _ = layer_around_attention(layer, c, layer_index, h, attend)
    return h_next, y, m


# every D x D map folds exactly into down_proj (realizable_output_map is the identity)
FOLDS_ANY_OUTPUT_MAP = True


def realizable_output_map(layer: dict, c, T: np.ndarray, A=None, B=None) -> np.ndarray:
    """The map ``fold_output_map`` writes for T: T itself (every map folds exactly)."""
    return T


def fold_output_map(layer: dict, c: LlamaConfig, T: np.ndarray, rewrite: HostRewrite = host_rewrite) -> dict:
    """The layer with its MLP branch ``M -> M T`` folded into ``down_proj`` (kernel and bias times T);
    exact. Products in float64 (``rewrite``: see ``common.HostRewrite``).
    Returns a new layer dict; the input is unchanged."""
    T = np.asarray(T, np.float64)
    layer = dict(layer)
    layer["mlp"] = dict(layer["mlp"])
    layer["mlp"]["down_proj"] = {name: rewrite(value, lambda a: a @ T) for name, value in
                                 layer["mlp"]["down_proj"].items()}
    return layer


def embed(params: Params, input_ids: jax.Array) -> jax.Array:
    return jnp.take(params["embed_tokens"]["embedding"], input_ids, axis=0)


def final_norm(params: Params, c: LlamaConfig, h: jax.Array) -> jax.Array:
    return rms_norm(h, params["norm"]["scale"], c.rms_norm_eps)


def lm_head(params: Params, c: LlamaConfig, normed: jax.Array) -> jax.Array:
    if c.tie_word_embeddings:
        return jnp.einsum("bsd,vd->bsv", normed, params["embed_tokens"]["embedding"])
    return normed @ params["lm_head"]["kernel"]


@dataclasses.dataclass
class ForwardOutput:
    logits: jax.Array | None
    hidden_states: list  # h_0 .. h_L (h_0 = embeddings), only where collected
    attn_residuals: list  # Y_k per collected layer
    mlp_outputs: list  # M_k per collected layer


jax.tree_util.register_dataclass(
    ForwardOutput, data_fields=["logits", "hidden_states", "attn_residuals", "mlp_outputs"], meta_fields=[]
)


def forward(
    params: Params,
    c: LlamaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    collect_layers: bool = False,
    num_layers: int | None = None,
    compute_logits: bool = True,
) -> ForwardOutput:
    """Run the decoder.

    ``num_layers`` stops after that many layers (capture passes need no more). With
    ``collect_layers`` the per-layer residual outputs ``h_k``, attention residuals ``Y_k`` and MLP
    branches ``M_k`` are returned. ``compute_logits=False`` skips the final norm and LM head.
    """
    ctx = attention_context(c, input_ids.shape, attention_mask, positions)
    return run_layers(params["layers"], embed(params, input_ids),
                      lambda index, layer, h: decoder_layer(layer, c, index, h, ctx),
                      lambda h: lm_head(params, c, final_norm(params, c, h)),
                      collect_layers=collect_layers, num_layers=num_layers, compute_logits=compute_logits)


def run_layers(layers, h, layer_step, head, *, collect_layers: bool, num_layers: int | None,
               compute_logits: bool) -> ForwardOutput:
    """The decoder loop every family's ``forward`` shares: ``layer_step(index, layer, h) -> (h, Y, M)``
    over the first ``num_layers`` layers, then ``head(h) -> logits`` (see ``forward`` for the rest)."""
    hidden, ys, ms = ([h], [], []) if collect_layers else ([], [], [])
    for index, layer in enumerate(layers[: num_layers if num_layers is not None else len(layers)]):
        h, y, m = layer_step(index, layer, h)
        if collect_layers:
            hidden.append(h)
            ys.append(y)
            ms.append(m)
    logits = None
    if compute_logits:
        logits = head(h)
    elif not collect_layers:
        hidden.append(h)
    return ForwardOutput(logits=logits, hidden_states=hidden, attn_residuals=ys, mlp_outputs=ms)
