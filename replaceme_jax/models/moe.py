"""Sparse mixture-of-experts decoders: `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`.

Attention, norms and rope are the Llama family's (``llama._attention`` etc.); only the MLP differs.
Experts are stacked in memory: ``experts.gate_proj.kernel`` / ``up_proj`` ``[E, D, I]``,
``down_proj`` ``[E, I, D]``; the router ``gate.kernel`` is ``[D, E]``. Dropping expert ``e`` is
deleting row ``e`` of every stacked kernel and column ``e`` of the router.

Routing follows transformers exactly: router logits in the model dtype, softmax over all experts in
float32, top-k of the probabilities, renormalised over the k when the family does so (`mixtral`
always; the others per ``norm_topk_prob``). ``decoder_layer_with_aux`` also returns what the expert
statistics need: the MoE input, the router logits, the routing and each routed expert's (ungated)
output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import llama
from replaceme_jax.models.common import HostRewrite, ParamSpec, Params, host_rewrite, rms_norm
from replaceme_jax.models.llama import FULL_ATTENTION, SLIDING_ATTENTION, AttentionContext, ForwardOutput

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# transformers' defaults where a config.json leaves a field out.
_DEFAULT_TOP_K = {"mixtral": 2, "qwen2_moe": 4, "qwen3_moe": 8, "olmoe": 8}
_DEFAULT_THETA = {"mixtral": 1e6, "qwen2_moe": 10000.0, "qwen3_moe": 10000.0, "olmoe": 10000.0}
# Spellings of the expert count; transformers aliases them (5.x writes `num_local_experts` for qwen3_moe).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")
_MOE_FIELDS = {
    *EXPERT_COUNT_KEYS, "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "clip_qkv", "qkv_bias",
}

Dispatch = Literal["auto", "dense", "ragged"]


@dataclasses.dataclass(frozen=True)
class MoeConfig(llama.LlamaConfig):
    """A Llama-family attention stack whose every MLP is a routed set of experts."""

    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # qwen2_moe's always-on expert; 0: none
    full_width_qk_norm: bool = False  # olmoe: q/k RMS norm over the whole projection, before the head split
    clip_qkv: float | None = None  # olmoe
    # config.json keys holding the expert count in the source (written back on export).
    expert_count_keys: tuple[str, ...] = ("num_experts",)

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts < self.num_experts_per_tok:
            raise UnsupportedModelError(
                f"{self.num_experts} experts is fewer than num_experts_per_tok={self.num_experts_per_tok}")

    def with_experts(self, num_experts: int) -> "MoeConfig":
        return dataclasses.replace(self, num_experts=num_experts)


def _expert_count(cfg: dict) -> tuple[int, tuple[str, ...]]:
    keys = tuple(k for k in EXPERT_COUNT_KEYS if cfg.get(k) is not None)
    if not keys:
        raise UnsupportedModelError(f"{cfg.get('model_type')}: config has no num_experts / num_local_experts")
    counts = {int(cfg[k]) for k in keys}
    if len(counts) > 1:
        raise UnsupportedModelError(f"num_experts and num_local_experts disagree ({cfg['num_experts']} vs "
                                    f"{cfg['num_local_experts']})")
    return counts.pop(), keys


def config_from_hf(cfg: dict) -> MoeConfig:
    """Parse an HF ``config.json`` dict, refusing anything this implementation would get wrong."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    unknown = sorted(k for k in cfg if k not in llama._IGNORED_FIELDS and k not in _MOE_FIELDS)
    if unknown:
        raise UnsupportedModelError(f"unsupported config field(s) for {model_type}: {', '.join(unknown)}")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"mlp_bias is not supported for {model_type}")
    if int(cfg.get("decoder_sparse_step") or 1) != 1:
        raise UnsupportedModelError(
            f"decoder_sparse_step={cfg['decoder_sparse_step']} (dense MLP layers) is not supported")
    if cfg.get("mlp_only_layers"):
        raise UnsupportedModelError("mlp_only_layers (dense MLP layers) is not supported")
    if model_type != "olmoe" and cfg.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"clip_qkv is not supported for {model_type}")

    cfg = dict(cfg)
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling") and "rope_theta" not in cfg:
        cfg["rope_theta"] = _DEFAULT_THETA[model_type]
    rope = llama._rope_from_hf(cfg)
    n_layers = int(cfg["num_hidden_layers"])
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    num_experts, count_keys = _expert_count(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))

    sliding_window = None
    layer_types = cfg.get("layer_types") or [FULL_ATTENTION] * n_layers
    if model_type == "mixtral":
        # transformers applies mixtral's window (if any) to every layer
        sliding_window = cfg.get("sliding_window")
        layer_types = [SLIDING_ATTENTION if sliding_window else FULL_ATTENTION] * n_layers
        if attention_bias:
            raise UnsupportedModelError("attention_bias is not supported for mixtral")
    elif cfg.get("use_sliding_window") or SLIDING_ATTENTION in layer_types:
        raise UnsupportedModelError(f"sliding-window attention is not supported for {model_type}")
    elif model_type == "olmoe" and cfg.get("sliding_window") is not None:
        raise UnsupportedModelError("sliding_window is not supported for olmoe")
    llama.check_layer_types(layer_types, sliding_window)
    if model_type == "olmoe" and head_dim * n_heads != hidden:
        raise UnsupportedModelError("olmoe with head_dim * num_attention_heads != hidden_size is not supported")

    if model_type in ("mixtral", "olmoe"):
        expert_size = int(cfg["intermediate_size"])
    else:
        expert_size = int(cfg["moe_intermediate_size"])
    shared_size = 0
    if model_type == "qwen2_moe":
        shared_size = int(cfg.get("shared_expert_intermediate_size") or 0)
        if shared_size < 1:
            raise UnsupportedModelError("qwen2_moe needs shared_expert_intermediate_size >= 1")
    qkv_bias = {"mixtral": False, "qwen2_moe": bool(cfg.get("qkv_bias", True))}.get(model_type, attention_bias)
    return MoeConfig(
        **llama.shared_config_fields(cfg, rope, intermediate_size=expert_size, tie_word_embeddings=False,
                                     max_position_embeddings=2048),
        model_type=model_type,
        qkv_bias=qkv_bias,
        o_bias=attention_bias if model_type in ("qwen3_moe", "olmoe") else False,
        qk_norm=model_type == "qwen3_moe",
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=tuple(layer_types),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or _DEFAULT_TOP_K[model_type]),
        moe_intermediate_size=expert_size,
        norm_topk_prob=True if model_type == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=shared_size,
        full_width_qk_norm=model_type == "olmoe",
        clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
        expert_count_keys=count_keys,
    )


def config_to_hf_updates(config: MoeConfig) -> dict:
    """Size fields to write into an exported ``config.json`` (under the source's own key spellings)."""
    updates: dict[str, Any] = {"num_hidden_layers": config.num_hidden_layers}
    updates.update({key: config.num_experts for key in config.expert_count_keys})
    if config.model_type == "qwen2_moe":
        updates["layer_types"] = list(config.layer_types)
    return updates


# ---------------------------------------------------------------------------------------------
# Parameters


def moe_specs(c: MoeConfig) -> dict:
    d, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    specs = {
        "gate": {"kernel": ParamSpec((d, e), ("embed", "experts"))},
        "experts": {
            "gate_proj": {"kernel": ParamSpec((e, d, i), ("experts", "embed", "mlp"))},
            "up_proj": {"kernel": ParamSpec((e, d, i), ("experts", "embed", "mlp"))},
            "down_proj": {"kernel": ParamSpec((e, i, d), ("experts", "mlp", "embed"))},
        },
    }
    if c.shared_expert_intermediate_size:
        s = c.shared_expert_intermediate_size
        specs["shared_expert"] = {
            "gate_proj": {"kernel": ParamSpec((d, s), ("embed", "mlp"))},
            "up_proj": {"kernel": ParamSpec((d, s), ("embed", "mlp"))},
            "down_proj": {"kernel": ParamSpec((s, d), ("mlp", "embed"))},
        }
        specs["shared_expert_gate"] = {"kernel": ParamSpec((d, 1), ("embed", None))}
    return specs


def layer_specs(c: MoeConfig) -> dict:
    specs = llama.layer_specs(c)  # attention and norms; its dense "mlp" is replaced below
    if c.full_width_qk_norm:
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        specs["self_attn"]["q_norm"] = {"scale": ParamSpec((q_dim,), ("norm",), init="ones")}
        specs["self_attn"]["k_norm"] = {"scale": ParamSpec((kv_dim,), ("norm",), init="ones")}
    specs["mlp"] = moe_specs(c)
    return specs


def param_specs(c: MoeConfig) -> dict:
    specs = {
        "embed_tokens": {"embedding": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"))},
        "layers": [layer_specs(c) for _ in range(c.num_hidden_layers)],
        "norm": {"scale": ParamSpec((c.hidden_size,), ("norm",), init="ones")},
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((c.hidden_size, c.vocab_size), ("embed", "vocab"))}
    return specs


# ---------------------------------------------------------------------------------------------
# Routing and experts


def route(p: dict, c: MoeConfig, x: jax.Array, expert_mask: jax.Array | None = None):
    """Router of one layer for tokens ``x [T, D]``: ``(logits [T, E], gates [T, k], experts [T, k])``.

    ``expert_mask [E]`` (bool) sets the logits of masked-out experts to -inf, which is exactly what
    removing them does (their softmax mass is zero; top-k picks among the rest).
    """
    logits = x @ p["kernel"]
    scores = logits.astype(jnp.float32)
    if expert_mask is not None:
        scores = jnp.where(expert_mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    gates, experts = jax.lax.top_k(probs, c.num_experts_per_tok)
    if c.norm_topk_prob:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return logits, gates, experts


def expert_hidden(p: dict, x: jax.Array) -> jax.Array:
    """Intermediate activations ``silu(x W_gate) * x W_up`` of every expert: ``x [T, D]`` -> ``[E, T, I]``."""
    gate = jnp.einsum("td,edi->eti", x, p["gate_proj"]["kernel"])
    up = jnp.einsum("td,edi->eti", x, p["up_proj"]["kernel"])
    return jax.nn.silu(gate) * up


def all_expert_outputs(p: dict, x: jax.Array) -> jax.Array:
    """Every expert on every token: ``x [T, D]`` -> ``[E, T, D]``."""
    return jnp.einsum("eti,eid->etd", expert_hidden(p, x), p["down_proj"]["kernel"])


def _routed_dense(p: dict, x: jax.Array, experts: jax.Array) -> jax.Array:
    out = all_expert_outputs(p, x)  # [E, T, D]
    return out[experts, jnp.arange(x.shape[0])[:, None]]  # [T, k, D]


def _routed_ragged(p: dict, x: jax.Array, experts: jax.Array) -> jax.Array:
    # Sort the (token, slot) pairs by expert and run one grouped matmul per projection.
    t, k = experts.shape
    num_experts = p["gate_proj"]["kernel"].shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)
    gate = jax.lax.ragged_dot(xs, p["gate_proj"]["kernel"], sizes)
    up = jax.lax.ragged_dot(xs, p["up_proj"]["kernel"], sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, p["down_proj"]["kernel"], sizes)
    return jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)


def resolve_dispatch(dispatch: Dispatch) -> str:
    if dispatch != "auto":
        return dispatch
    # XLA:CPU lowers ragged_dot to a masked dense matmul over all groups (k times the dense cost);
    # accelerators have grouped matmuls.
    return "dense" if jax.default_backend() == "cpu" else "ragged"


def routed_expert_outputs(p: dict, x: jax.Array, experts: jax.Array, dispatch: Dispatch = "auto") -> jax.Array:
    """Ungated output ``f_e(x)`` of each routed expert: ``x [T, D]``, ``experts [T, k]`` -> ``[T, k, D]``.

    ``dense`` runs every expert on every token (E/k times the work, fastest for tiny models and on
    CPU); ``ragged`` only the routed pairs. Both are exact.
    """
    if resolve_dispatch(dispatch) == "dense":
        return _routed_dense(p, x, experts)
    return _routed_ragged(p, x, experts)


def combine(c: MoeConfig, outputs: jax.Array, gates: jax.Array) -> jax.Array:
    """``sum_k g_k f_k(x)`` with transformers' casts: mixtral scales in float32, the others in the model dtype."""
    if c.model_type == "mixtral":
        scaled = (outputs.astype(jnp.float32) * gates[..., None]).astype(outputs.dtype)
    else:
        scaled = outputs * gates.astype(outputs.dtype)[..., None]
    return jnp.sum(scaled, axis=-2)


@dataclasses.dataclass
class MoeAux:
    """What one MoE layer saw and did, for expert statistics (``T = B * S`` tokens, pad tokens included)."""

    x: jax.Array  # [T, D] MoE input (after the post-attention norm)
    router_logits: jax.Array  # [T, E] in the model dtype
    gates: jax.Array  # [T, k] float32 gate of each routed expert, as applied
    experts: jax.Array  # [T, k] routed expert indices
    outputs: jax.Array  # [T, k, D] ungated outputs f_e(x) of the routed experts


jax.tree_util.register_dataclass(
    MoeAux, data_fields=["x", "router_logits", "gates", "experts", "outputs"], meta_fields=[])


def moe_block(p: dict, c: MoeConfig, x: jax.Array, *, expert_mask: jax.Array | None = None,
              dispatch: Dispatch = "auto") -> tuple[jax.Array, MoeAux]:
    """The sparse MLP of one layer: ``x [B, S, D]`` -> (output ``[B, S, D]``, aux)."""
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    logits, gates, experts = route(p["gate"], c, flat, expert_mask)
    outputs = routed_expert_outputs(p["experts"], flat, experts, dispatch)
    y = combine(c, outputs, gates)
    if "shared_expert" in p:
        shared = llama._mlp(p["shared_expert"], flat)
        y = y + jax.nn.sigmoid(flat @ p["shared_expert_gate"]["kernel"]) * shared
    aux = MoeAux(x=flat, router_logits=logits, gates=gates, experts=experts, outputs=outputs)
    return y.reshape(b, s, d), aux


# ---------------------------------------------------------------------------------------------
# Layers and forward


def olmoe_project_qkv(p: dict, c: MoeConfig, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``llama.project_qkv`` for OLMoE: q and k normalised over the whole projection before the head
    split, then q, k and v clipped to ``clip_qkv``."""
    b, s, _ = x.shape
    hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = rms_norm(llama._dense(p["q_proj"], x), p["q_norm"]["scale"], c.rms_norm_eps)
    k = rms_norm(llama._dense(p["k_proj"], x), p["k_norm"]["scale"], c.rms_norm_eps)
    v = llama._dense(p["v_proj"], x)
    if c.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
    return q.reshape(b, s, hq, hd), k.reshape(b, s, hkv, hd), v.reshape(b, s, hkv, hd)


def project_qkv(c: MoeConfig):
    """The q/k/v projection of this family."""
    return olmoe_project_qkv if c.full_width_qk_norm else llama.project_qkv


def layer_around_attention(layer: dict, c: MoeConfig, layer_index: int, h: jax.Array, attend, *,
                           expert_mask: jax.Array | None = None, dispatch: Dispatch = "auto"):
    """One pre-norm layer around a given attention (``llama.layer_around_attention``'s contract):
    ``(h_next, Y, M, (attention aux, MoeAux))``."""
    normed = rms_norm(h, layer["input_layernorm"]["scale"], c.rms_norm_eps)
    attn_out, attn_aux = attend(layer["self_attn"], normed)
    y = h + attn_out
    m, aux = moe_block(layer["mlp"], c, rms_norm(y, layer["post_attention_layernorm"]["scale"], c.rms_norm_eps),
                       expert_mask=expert_mask, dispatch=dispatch)
    return y + m, y, m, (attn_aux, aux)


def decoder_layer_with_aux(
    layer: dict, c: MoeConfig, layer_index: int, h: jax.Array, ctx: AttentionContext, *,
    expert_mask: jax.Array | None = None, dispatch: Dispatch = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array, MoeAux]:
    """One pre-norm layer: ``(h_next, Y, M, aux)`` (output, residual after attention, MoE branch, aux)."""
    def attend(p, x):
        return llama._attention(p, c, x, ctx, c.window_of_layer(layer_index), project=project_qkv(c)), None

    h_next, y, m, (_, aux) = layer_around_attention(layer, c, layer_index, h, attend, expert_mask=expert_mask,
                                                    dispatch=dispatch)
    return h_next, y, m, aux


def decoder_layer(layer: dict, c: MoeConfig, layer_index: int, h: jax.Array, ctx: AttentionContext,
                  **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same contract as ``llama.decoder_layer``: ``(h_next, Y, M)``."""
    h_next, y, m, _ = decoder_layer_with_aux(layer, c, layer_index, h, ctx, **kwargs)
    return h_next, y, m


attention_context = llama.attention_context
embed = llama.embed
final_norm = llama.final_norm
lm_head = llama.lm_head
qkv_projection = project_qkv


FOLDS_ANY_OUTPUT_MAP = True  # into every expert's down_proj


def realizable_output_map(layer: dict, c, T: np.ndarray, A=None, B=None) -> np.ndarray:
    """The map ``fold_output_map`` writes for T: T itself (every map folds exactly)."""
    return T


def fold_output_map(layer: dict, c: MoeConfig, T, rewrite: HostRewrite = host_rewrite) -> dict:
    """The layer with its MoE branch ``M -> M T`` folded in; exact, since the branch is linear in every
    expert's output: each routed expert's ``down_proj`` and the shared expert's (whose sigmoid gate
    scales its output) times T. Returns a new layer dict."""
    T = np.asarray(T, np.float64)
    layer = dict(layer)
    mlp = dict(layer["mlp"])
    experts = dict(mlp["experts"])
    experts["down_proj"] = {name: rewrite(value, lambda a: a @ T) for name, value in
                            experts["down_proj"].items()}
    mlp["experts"] = experts
    if "shared_expert" in mlp:
        shared = dict(mlp["shared_expert"])
        shared["down_proj"] = {name: rewrite(value, lambda a: a @ T) for name, value in
                               shared["down_proj"].items()}
        mlp["shared_expert"] = shared
    layer["mlp"] = mlp
    return layer


def forward(
    params: Params,
    c: MoeConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    collect_layers: bool = False,
    num_layers: int | None = None,
    compute_logits: bool = True,
    expert_masks: list | None = None,
    dispatch: Dispatch = "auto",
) -> ForwardOutput:
    """Run the decoder (same contract as ``llama.forward``).

    ``expert_masks[l]`` (bool ``[E]``) sets the router logits of layer ``l``'s masked experts to -inf.
    """
    ctx = llama.attention_context(c, input_ids.shape, attention_mask, positions)

    def layer_step(index, layer, h):
        mask = expert_masks[index] if expert_masks is not None else None
        return decoder_layer(layer, c, index, h, ctx, expert_mask=mask, dispatch=dispatch)

    return llama.run_layers(params["layers"], llama.embed(params, input_ids), layer_step,
                            lambda h: llama.lm_head(params, c, llama.final_norm(params, c, h)),
                            collect_layers=collect_layers, num_layers=num_layers, compute_logits=compute_logits)
