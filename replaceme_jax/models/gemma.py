"""Gemma 2 and Gemma 3 text decoders: `gemma2`, `gemma3_text`.

What differs from the Llama family (``llama.py``, whose attention this reuses):

- embeddings times ``sqrt(hidden_size)``, the factor rounded to the model dtype;
- RMSNorm with a zero-centred weight: ``normed(x) * (1 + w)`` computed in float32, cast once; params
  keep HF's ``w`` (so round trips are bit-exact), and a GGUF file stores ``1 + w``;
- a GELU-tanh gated MLP (``hidden_activation: gelu_pytorch_tanh``);
- four norms per layer: ``input_layernorm`` -> attention -> ``post_attention_layernorm`` -> residual add;
  ``pre_feedforward_layernorm`` -> MLP -> ``post_feedforward_layernorm`` -> residual add;
- scores scaled by ``query_pre_attn_scalar ** -0.5``;
- Gemma 2: attention scores soft-capped (``cap * tanh(s / cap)``, before the mask) and final logits
  soft-capped; Gemma 3: per-head q/k norms (the same ``1 + w`` RMSNorm) and no soft-capping
  (transformers ignores ``attn_logit_softcapping`` for Gemma 3, and so does this);
- sliding-window and full-attention layers (``layer_types``); Gemma 3 gives each kind its own rope
  (sliding: ``rope_local_base_freq``, 10k; full: ``rope_theta``, 1M, with optional linear scaling).

``M`` (the MLP branch a ReplaceMe map acts on) is everything the MLP sub-block adds to the residual
stream: the output of ``post_feedforward_layernorm``. See ``fold_output_map`` for how a map on it is
written back into the weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import llama
from replaceme_jax.models.attention import softcap
from replaceme_jax.models.common import (
    DROP_FIELD,
    HostRewrite,
    IfPresent,
    ParamSpec,
    Params,
    host_rewrite,
    rope_inverse_frequencies,
    rotary_cos_sin,
)
from replaceme_jax.models.llama import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    AttentionContext,
    ForwardOutput,
    run_layers,
    _dense,
)

MODEL_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
_DEFAULT_THETA = {"gemma2": 10000.0, "gemma3_text": 1_000_000.0}
_DEFAULT_LOCAL_THETA = 10000.0
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is full attention (transformers' default)
_GEMMA_FIELDS = {
    "hidden_activation", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
    "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern", "use_bidirectional_attention",
    "cache_implementation", "hidden_act",
}
# config.json keys that restate layer_types; after layers are removed they are rewritten or dropped.
PATTERN_KEYS = ("sliding_window_pattern", "_sliding_window_pattern")


@dataclasses.dataclass(frozen=True)
class GemmaConfig(llama.LlamaConfig):
    """``rope_*`` of the base class are the full-attention layers' rope; ``local_rope_*`` the sliding ones'."""

    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float = _DEFAULT_LOCAL_THETA
    local_rope_type: str = "default"
    local_rope_params: tuple[tuple[str, float], ...] = ()

    @property
    def local_inv_freq(self) -> np.ndarray:
        return rope_inverse_frequencies(self.head_dim, self.local_rope_theta, self.local_rope_type,
                                        dict(self.local_rope_params))

    def inv_freq_of_layer(self, layer: int) -> np.ndarray:
        return self.local_inv_freq if self.layer_types[layer] == SLIDING_ATTENTION else self.inv_freq

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def attention_softcap(self) -> float | None:
        return self.attn_logit_softcapping

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)


def _rope(sub: dict | None, default_theta: float) -> tuple[float, str, dict]:
    sub = dict(sub or {})
    sub.setdefault("rope_theta", default_theta)
    return llama._rope_from_hf({"rope_parameters": sub})


def _ropes_from_hf(cfg: dict, model_type: str) -> tuple[tuple[float, str, dict], tuple[float, str, dict]]:
    """(full-attention rope, sliding-attention rope) from either spelling: transformers 5's
    ``rope_parameters`` (nested per layer kind for Gemma 3) or 4.x's ``rope_theta``/``rope_scaling``
    (+ ``rope_local_base_freq``)."""
    params = cfg.get("rope_parameters")
    if model_type == "gemma2":
        full = llama._rope_from_hf(cfg if params or cfg.get("rope_scaling") or "rope_theta" in cfg
                                   else {"rope_theta": _DEFAULT_THETA[model_type]})
        return full, full
    if params and (FULL_ATTENTION in params or SLIDING_ATTENTION in params):
        unknown = set(params) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise UnsupportedModelError(f"unsupported rope_parameters keys for gemma3: {sorted(unknown)}")
        return (_rope(params.get(FULL_ATTENTION), _DEFAULT_THETA[model_type]),
                _rope(params.get(SLIDING_ATTENTION), _DEFAULT_LOCAL_THETA))
    full = dict(params or cfg.get("rope_scaling") or {})
    full.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA[model_type]))
    local = {"rope_theta": cfg.get("rope_local_base_freq", _DEFAULT_LOCAL_THETA)}
    return _rope(full, _DEFAULT_THETA[model_type]), _rope(local, _DEFAULT_LOCAL_THETA)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def config_from_hf(cfg: dict) -> GemmaConfig:
    """Parse an HF ``config.json`` dict (transformers 4.x or 5.x), refusing what this would get wrong."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        if model_type == "gemma3":
            raise UnsupportedModelError(
                "gemma3 image-text checkpoints are not supported; convert the text model (gemma3_text, e.g. a "
                "Gemma 3 GGUF file or a Gemma3ForCausalLM directory)")
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    unknown = sorted(k for k in cfg if k not in llama._IGNORED_FIELDS and k not in _GEMMA_FIELDS)
    if unknown:
        raise UnsupportedModelError(f"unsupported config field(s) for {model_type}: {', '.join(unknown)}")
    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention is not supported")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"mlp_bias is not supported for {model_type}")
    rope, (local_theta, local_type, local_rope) = _ropes_from_hf(cfg, model_type)
    n_layers = int(cfg["num_hidden_layers"])
    sliding_window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                      or _DEFAULT_PATTERN[model_type])
        layer_types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n_layers)]
    llama.check_layer_types(layer_types, sliding_window)
    attention_bias = bool(cfg.get("attention_bias", False))
    return GemmaConfig(
        **llama.shared_config_fields(cfg, rope, intermediate_size=int(cfg["intermediate_size"]),
                                     tie_word_embeddings=True, max_position_embeddings=8192),
        model_type=model_type,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=model_type == "gemma3_text",
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping, whatever the config says
        attn_logit_softcapping=(_optional_float(cfg.get("attn_logit_softcapping", 50.0))
                                if model_type == "gemma2" else None),
        final_logit_softcapping=_optional_float(
            cfg.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None)),
        local_rope_theta=local_theta,
        local_rope_type=local_type,
        local_rope_params=tuple(sorted((k, float(v)) for k, v in local_rope.items())),
    )


def _pattern_of(layer_types: Sequence[str]) -> int | None:
    """The n for which layer_types is "every n-th layer full attention", if any."""
    for n in range(1, len(layer_types) + 2):
        if list(layer_types) == [SLIDING_ATTENTION if (i + 1) % n else FULL_ATTENTION
                                 for i in range(len(layer_types))]:
            return n
    return None


def config_to_hf_updates(config: GemmaConfig) -> dict:
    """Per-layer fields to write into an exported ``config.json``: ``layer_types`` always, and a
    sliding-window pattern key the source has rewritten when the kept layers still follow one, else
    removed (``layer_types`` alone then says which layers slide)."""
    updates: dict[str, Any] = {"num_hidden_layers": config.num_hidden_layers,
                               "layer_types": list(config.layer_types)}
    pattern = _pattern_of(config.layer_types)
    for key in PATTERN_KEYS:
        updates[key] = IfPresent(pattern) if pattern is not None else DROP_FIELD
    return updates


# ---------------------------------------------------------------------------------------------
# Parameters


def _norm(dim: int, axis: str = "norm") -> dict:
    return {"scale": ParamSpec((dim,), (axis,), init="zeros")}  # the weight w of (1 + w)


def layer_specs(c: GemmaConfig) -> dict:
    specs = llama.layer_specs(c)
    for name in ("input_layernorm", "post_attention_layernorm"):
        specs[name] = _norm(c.hidden_size)
    specs["pre_feedforward_layernorm"] = _norm(c.hidden_size)
    specs["post_feedforward_layernorm"] = _norm(c.hidden_size)
    if c.qk_norm:
        specs["self_attn"]["q_norm"] = _norm(c.head_dim, "head_dim")
        specs["self_attn"]["k_norm"] = _norm(c.head_dim, "head_dim")
    return specs


def param_specs(c: GemmaConfig) -> dict:
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


def gemma_rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32, cast once to x's dtype (as transformers)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def _norm_apply(p: dict, c: GemmaConfig, x: jax.Array) -> jax.Array:
    return gemma_rms_norm(x, p["scale"], c.rms_norm_eps)


@dataclasses.dataclass(frozen=True)
class GemmaContext:
    """One attention context per layer kind (they differ in their rope tables only)."""

    full: AttentionContext
    sliding: AttentionContext

    def for_layer(self, c: GemmaConfig, layer_index: int) -> AttentionContext:
        return self.sliding if c.layer_types[layer_index] == SLIDING_ATTENTION else self.full


def attention_context(c: GemmaConfig, input_shape, attention_mask=None, positions=None) -> GemmaContext:
    full = llama.attention_context(c, input_shape, attention_mask, positions)
    if np.array_equal(c.local_inv_freq, c.inv_freq):
        return GemmaContext(full=full, sliding=full)
    cos, sin = rotary_cos_sin(full.positions, c.local_inv_freq)
    return GemmaContext(full=full, sliding=dataclasses.replace(full, cos=cos, sin=sin))


def project_qkv(p: dict, c: GemmaConfig, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys, values ``[B, S, heads, hd]`` before rope; Gemma 3 normalises q and k per head."""
    b, s, _ = x.shape
    q = _dense(p["q_proj"], x).reshape(b, s, c.num_attention_heads, c.head_dim)
    k = _dense(p["k_proj"], x).reshape(b, s, c.num_key_value_heads, c.head_dim)
    v = _dense(p["v_proj"], x).reshape(b, s, c.num_key_value_heads, c.head_dim)
    if c.qk_norm:
        q = _norm_apply(p["q_norm"], c, q)
        k = _norm_apply(p["k_norm"], c, k)
    return q, k, v


def qkv_projection(c: GemmaConfig):
    return project_qkv


def mlp_pre_norm(p: dict, x: jax.Array) -> jax.Array:
    """The gated MLP before ``post_feedforward_layernorm``: ``down(gelu_tanh(gate x) * up x)``."""
    return _dense(p["down_proj"], jax.nn.gelu(_dense(p["gate_proj"], x), approximate=True) * _dense(p["up_proj"], x))


def layer_around_attention(layer: dict, c: GemmaConfig, layer_index: int, h: jax.Array, attend):
    """One layer around a given attention (``llama.layer_around_attention``'s contract):
    ``(h_next, Y, M, aux)`` with ``M`` the MLP sub-block's output after its post-norm."""
    attn_out, aux = attend(layer["self_attn"], _norm_apply(layer["input_layernorm"], c, h))
    y = h + _norm_apply(layer["post_attention_layernorm"], c, attn_out)
    z = mlp_pre_norm(layer["mlp"], _norm_apply(layer["pre_feedforward_layernorm"], c, y))
    m = _norm_apply(layer["post_feedforward_layernorm"], c, z)
    return y + m, y, m, aux


def decoder_layer(layer: dict, c: GemmaConfig, layer_index: int, h: jax.Array, ctx: GemmaContext
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same contract as ``llama.decoder_layer``: ``(h_next, Y, M)``."""
    def attend(p, x):
        return llama._attention(p, c, x, ctx.for_layer(c, layer_index), c.window_of_layer(layer_index),
                                project=project_qkv), None

    h_next, y, m, _ = layer_around_attention(layer, c, layer_index, h, attend)
    return h_next, y, m


def embed(params: Params, input_ids: jax.Array) -> jax.Array:
    """Embeddings times ``sqrt(hidden_size)``; the factor is a float32 rounded to the weights' dtype."""
    table = params["embed_tokens"]["embedding"]
    scale = jnp.asarray(np.float32(math.sqrt(table.shape[-1])), jnp.float32).astype(table.dtype)
    return jnp.take(table, input_ids, axis=0) * scale


def final_norm(params: Params, c: GemmaConfig, h: jax.Array) -> jax.Array:
    return _norm_apply(params["norm"], c, h)


def lm_head(params: Params, c: GemmaConfig, normed: jax.Array) -> jax.Array:
    return softcap(llama.lm_head(params, c, normed), c.final_logit_softcapping)


def forward(
    params: Params,
    c: GemmaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    collect_layers: bool = False,
    num_layers: int | None = None,
    compute_logits: bool = True,
) -> ForwardOutput:
    """Run the decoder (same contract as ``llama.forward``)."""
    ctx = attention_context(c, input_ids.shape, attention_mask, positions)
    return run_layers(params["layers"], embed(params, input_ids),
                      lambda index, layer, h: decoder_layer(layer, c, index, h, ctx),
                      lambda h: lm_head(params, c, final_norm(params, c, h)),
                      collect_layers=collect_layers, num_layers=num_layers, compute_logits=compute_logits)


# ---------------------------------------------------------------------------------------------
# Folding a map on the MLP branch
#
# M = RMSNorm(z) * g with z the MLP output and g = 1 + w the post-MLP norm's scale. A map M -> M T folds
# into the weights exactly when T = diag(g)^-1 Q diag(s) with Q orthogonal: RMSNorm(z Q) = RMSNorm(z) Q
# (Q keeps every row's norm), so Q goes into down_proj and s becomes the norm's scale. BENCHMARKS.md
# ("Gemma 2 / Gemma 3") compares this with the other ways through the norm.


def _branch_scale(layer: dict) -> np.ndarray:
    return 1.0 + np.asarray(layer["post_feedforward_layernorm"]["scale"], np.float64)


def _polar(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a)
    return u @ vt


def decompose_output_map(layer: dict, c: GemmaConfig, T: np.ndarray, tol: float = 1e-6):
    """``(Q, s)`` with ``T = diag(g)^-1 Q diag(s)``, Q orthogonal to ``tol``; None when T has no such form."""
    T_R = _branch_scale(layer)[:, None] * np.asarray(T, np.float64)
    s = np.linalg.norm(T_R, axis=0)
    if np.any(s == 0):
        return None
    Q = T_R / s[None, :]
    if np.max(np.abs(Q.T @ Q - np.eye(len(s)))) > tol:
        return None
    return Q, s


def _orthogonal_scaled_objective(A: np.ndarray, B: np.ndarray, Q: np.ndarray):
    """For a fixed Q: the best s, ``tr(S Q^T A Q S) - 2 tr(S Q^T B)`` at it, and its Riemannian gradient."""
    AQ = A @ Q
    den = np.einsum("ij,ij->j", Q, AQ)
    num = np.einsum("ij,ij->j", Q, B)
    s = num / np.maximum(den, 1e-300)
    grad = 2 * (AQ * s**2 - B * s)
    sym = Q.T @ grad
    return -float(np.sum(num * s)), s, grad - Q @ (0.5 * (sym + sym.T))


def _retract(x: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(x)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def fit_orthogonal_scaled(A: np.ndarray, B: np.ndarray, Q0: np.ndarray, iterations: int = 300):
    """``min ||R Q diag(s) - target||^2`` over orthogonal Q and diagonal s from the normal equations of
    the rows R (``A = R^T R``, ``B = R^T target``): s in closed form for each Q, Q by Riemannian gradient
    descent (Barzilai-Borwein steps, a step that does not descend is halved; QR retraction) from the
    better of ``Q0`` and ``polar(B)``. Returns ``(Q, s)``."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    Q = min((_polar(Q0), _polar(B)), key=lambda q: _orthogonal_scaled_objective(A, B, q)[0])
    f, s, xi = _orthogonal_scaled_objective(A, B, Q)
    eta = 1.0 / (2 * np.linalg.eigvalsh(A)[-1] * max(float(np.max(s**2)), 1e-300))
    for _ in range(iterations):
        Qn = _retract(Q - eta * xi)
        fn, sn, xin = _orthogonal_scaled_objective(A, B, Qn)
        if fn > f:
            eta *= 0.5
            continue
        dQ, dxi = Qn - Q, xin - xi
        curvature = float(np.sum(dQ * dxi))
        eta = abs(float(np.sum(dQ * dQ)) / curvature) if curvature != 0 else eta
        Q, f, s, xi = Qn, fn, sn, xin
    return Q, s


# The post-MLP norm sits between down_proj and the residual: only maps diag(g)^-1 Q diag(s) fold exactly.
FOLDS_ANY_OUTPUT_MAP = False


def realizable_output_map(layer: dict, c: GemmaConfig, T: np.ndarray, A: np.ndarray | None = None,
                          B: np.ndarray | None = None, iterations: int = 300) -> np.ndarray:
    """The map on M that ``fold_output_map`` writes for ``T``: T itself when it folds exactly, else the
    nearest ``diag(g)^-1 Q diag(s)``. With the fit's normal equations of M (``A = M^T M``,
    ``B = M^T (h_end - Y)``) "nearest" is on the data (``fit_orthogonal_scaled`` from T's polar factor);
    without them, in the Frobenius norm of ``diag(g) T`` (polar factor and per-column scale, alternated)."""
    T = np.asarray(T, np.float64)
    if decompose_output_map(layer, c, T) is not None:
        return T
    g = _branch_scale(layer)
    T_R = g[:, None] * T
    if A is not None and B is not None:
        # M = R diag(g): the normal equations of the normalised rows R
        Q, s = fit_orthogonal_scaled(np.asarray(A) / np.outer(g, g), np.asarray(B) / g[:, None], T_R, iterations)
    else:
        Q = _polar(T_R)
        for _ in range(30):
            s = np.einsum("ij,ij->j", Q, T_R)
            Q = _polar(T_R * s[None, :])
        s = np.einsum("ij,ij->j", Q, T_R)
    return (Q * s[None, :]) / g[:, None]


def fold_output_map(layer: dict, c: GemmaConfig, T: np.ndarray, rewrite: HostRewrite = host_rewrite) -> dict:
    """The layer with ``M -> M T`` written into its weights: ``T = diag(g)^-1 Q diag(s)`` becomes
    ``down_proj @ Q`` and the post-MLP norm scale ``s`` (weight ``s - 1``); exact. A T of another form is
    first replaced by ``realizable_output_map(layer, c, T)`` (validation scores that same map)."""
    parts = decompose_output_map(layer, c, T) or decompose_output_map(layer, c, realizable_output_map(layer, c, T))
    Q, s = parts
    layer = dict(layer)
    mlp = dict(layer["mlp"])
    mlp["down_proj"] = {name: rewrite(value, lambda a: a @ Q) for name, value in mlp["down_proj"].items()}
    layer["mlp"] = mlp
    layer["post_feedforward_layernorm"] = {
        "scale": rewrite(layer["post_feedforward_layernorm"]["scale"], lambda a: s - 1.0)}
    return layer
