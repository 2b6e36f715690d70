"""The jitted KV-cache sampler: continuations of token prompts, for calibration text sampled from the
model itself (``replaceme_jax.data.self_generated``) and for greedy generations (``eval_generation``).

Generation is one jitted function per batch over the params pytree of any family in ``models/``: a prefill
of the prompt prefix every row shares fills a preallocated KV cache (one ``[B, kv_heads, T, head_dim]``
pair per layer), then a ``lax.while_loop`` feeds one token per step until every row has emitted EOS or
reached its length. Rows have no padding inside them (all start at position 0), so the attention mask
is plain causal (plus the layer's sliding window) and the cache needs no validity mask. Prompt tokens
past the shared prefix are fed through the same loop, forced instead of sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.errors import ReplaceMeError, UnsupportedModelError
from replaceme_jax.models import FAMILIES, attention, family_for, llama
from replaceme_jax.models.common import Params, apply_rotary, rotary_cos_sin

log = logging.getLogger(__name__)

KVCache = list  # [(k, v)] per layer, each [B, kv_heads, T, head_dim]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_new_tokens: int = 0  # EOS is suppressed until a row has this many new tokens

    def __post_init__(self):
        if self.temperature < 0:
            raise ReplaceMeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ReplaceMeError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ReplaceMeError(f"top_p must be in (0, 1], got {self.top_p}")


def init_cache(c: llama.LlamaConfig, batch: int, length: int, dtype) -> KVCache:
    shape = (batch, c.num_key_value_heads, length, c.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_hidden_layers)]


def _cached_attention(p: dict, c: llama.LlamaConfig, x: jax.Array, start: jax.Array, cos, sin,
                      k_cache: jax.Array, v_cache: jax.Array, window: int | None, project):
    """The family's attention for tokens at positions ``start..start+S-1`` against the cache (written
    first); ``project`` is the family's q/k/v projection."""
    s = x.shape[1]
    q, k, v = project(p, c, x)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    # The cache is [B, kv_heads, T, head_dim]: both attention products are then plain batched matmuls
    # over (B, kv_heads); with T second, XLA on CPU transposed the whole cache in every step (2-3x slower).
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, start, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, start, 0))
    out = attention.attend(q, k_cache, v_cache, scale=c.attention_scale,
                           q_positions=(start + jnp.arange(s, dtype=jnp.int32))[None, :],
                           k_positions=jnp.arange(k_cache.shape[2], dtype=jnp.int32)[None, :], window=window,
                           logit_softcap=c.attention_softcap, implementation=c.attention_implementation)
    return llama._dense(p["o_proj"], out), k_cache, v_cache


def forward_cached(params: Params, c: llama.LlamaConfig, tokens: jax.Array, start: jax.Array, cache: KVCache,
                   *, compute_logits: bool = True) -> tuple[jax.Array | None, KVCache]:
    """Run ``tokens`` [B, S] at positions ``start..start+S-1`` (same for every row), updating the cache.

    Each layer is the family's own (``layer_around_attention``) around the cached attention. Returns the
    logits of the last position [B, V] in float32 (None without ``compute_logits``).
    """
    family = family_for(c.model_type)
    project = family.qkv_projection(c)
    b, s = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    tables: dict[bytes, tuple] = {}  # rope tables by frequencies (Gemma 3: one per layer kind)
    h = family.embed(params, tokens)
    new_cache = []
    for index, (layer, (k_cache, v_cache)) in enumerate(zip(params["layers"], cache)):
        inv_freq = c.inv_freq_of_layer(index)
        cos, sin = tables.setdefault(inv_freq.tobytes(), rotary_cos_sin(positions, inv_freq))

        def attend(p, x, k_cache=k_cache, v_cache=v_cache, cos=cos, sin=sin, index=index):
            out, k_new, v_new = _cached_attention(p, c, x, start, cos, sin, k_cache, v_cache, c.window_of_layer(index),
                                                  project)
            new_cache.append((k_new, v_new))  # the layer's updated cache (attend runs once per layer)
            return out, None

        h, _, _, _ = family.layer_around_attention(layer, c, index, h, attend)
    if not compute_logits:
        return None, new_cache
    logits = family.lm_head(params, c, family.final_norm(params, c, h[:, -1:]))[:, 0]
    return logits.astype(jnp.float32), new_cache


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        # Mask everything below the k-th largest logit (ties at the threshold stay in, as in transformers).
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = jnp.where(nucleus_mask(jax.nn.softmax(logits, axis=-1), sampling.top_p), logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def nucleus_mask(probs: jax.Array, top_p: float, iterations: int = 40) -> jax.Array:
    """The top-p set of each row of ``probs`` [B, V]: the most likely tokens whose mass first reaches ``top_p``.

    ``mass(t) = sum(probs >= t)`` falls as ``t`` rises; the nucleus is ``probs >= t*`` for the largest
    ``t*`` with ``mass(t*) >= top_p``. Bisection finds ``t*`` to within ``2**-40`` by masked sums; the
    usual sort of a 50k-150k vocabulary made each CPU decode step about 2x slower.
    """
    def mass(t):
        return jnp.sum(jnp.where(probs >= t, probs, 0.0), axis=-1, keepdims=True)

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = mass(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(probs.shape[:-1] + (1,), probs.dtype)
    hi = jnp.max(probs, axis=-1, keepdims=True)  # mass(max) >= top_p is possible; then lo ends close to it
    lo, hi = jax.lax.fori_loop(0, iterations, step, (lo, hi))
    lo = jnp.where(mass(hi) >= top_p, hi, lo)  # the most likely token alone already reaches top_p
    return probs >= lo


DECODE_CHUNK = 16  # decoding steps per jitted call: between calls Ctrl-C is honoured and progress shown


@functools.partial(jax.jit, static_argnames=("c", "prefix"))
def _prefill(params, tokens, *, c, prefix):
    """A KV cache holding the first ``prefix - 1`` prompt tokens (every row has at least ``prefix``)."""
    b, total = tokens.shape
    cache = init_cache(c, b, total, params["embed_tokens"]["embedding"].dtype)
    if prefix > 1:
        _, cache = forward_cached(params, c, tokens[:, : prefix - 1], jnp.int32(0), cache, compute_logits=False)
    return cache


@functools.partial(jax.jit, static_argnames=("c", "sampling", "pad_id", "steps"))
def _decode_chunk(params, state, prompt_lengths, limits, eos_ids, key, *, c, sampling, pad_id, steps):
    """Up to ``steps`` decoding steps of ``state = (t, tokens, cache, done, lengths)``."""
    total = state[1].shape[1]

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    def cond(carry):
        i, (t, _, _, done, _) = carry
        return (i < steps) & (t < total - 1) & ~jnp.all(done)

    def body(carry):
        i, (t, toks, cache, done, lengths) = carry
        current = jax.lax.dynamic_slice_in_dim(toks, t, 1, axis=1)
        logits, cache = forward_cached(params, c, current, t, cache)
        p = t + 1  # the position being chosen
        if sampling.min_new_tokens > 0:
            too_early = (p - prompt_lengths) < sampling.min_new_tokens
            eos_mask = jnp.any(jnp.arange(logits.shape[-1])[:, None] == eos_ids[None, :], axis=-1)
            logits = jnp.where(too_early[:, None] & eos_mask[None, :], -jnp.inf, logits)
        sampled = sample_logits(logits, jax.random.fold_in(key, t), sampling)
        in_prompt = p < prompt_lengths
        chosen = jnp.where(in_prompt, toks[:, p], jnp.where(done, pad_id, sampled))
        stops = ~in_prompt & ~done & is_eos(chosen)
        lengths = jnp.where(stops, p + 1, lengths)  # the EOS token is kept
        done = done | stops | (~in_prompt & (p + 1 >= limits))
        toks = jax.lax.dynamic_update_slice_in_dim(toks, chosen[:, None], p, axis=1)
        return i + 1, (t + 1, toks, cache, done, lengths)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


def _generate_batch(params, tokens, prompt_lengths, limits, eos_ids, key, *, c, prefix, sampling, pad_id,
                    progress=None):
    """tokens [B, T]: prompts, right-padded with ``pad_id``. Returns (tokens [B, T], lengths [B]).

    Decoding runs in chunks of ``DECODE_CHUNK`` steps, so a stop request is honoured within one chunk."""
    total = tokens.shape[1]
    cache = _prefill(params, tokens, c=c, prefix=prefix)
    state = (jnp.int32(prefix - 1), tokens, cache, prompt_lengths >= limits, limits)
    t = prefix - 1
    while True:
        interrupt.check()
        state = _decode_chunk(params, state, prompt_lengths, limits, eos_ids, key, c=c, sampling=sampling,
                              pad_id=pad_id, steps=DECODE_CHUNK)
        t_now = int(state[0])
        if progress is not None:
            progress(t_now - t)
        t = t_now
        if t >= total - 1 or bool(jnp.all(state[3])):
            break
    return state[1], state[4]


def generate(
    params: Params,
    c: llama.LlamaConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    key: jax.Array,
    *,
    sampling: Sampling = Sampling(),
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens, stopping a row at EOS.

    Returns ``(tokens [B, T], lengths [B])`` with ``T = longest prompt + max_new_tokens``: row ``i`` is
    ``tokens[i, :lengths[i]]`` (prompt, new tokens, and the EOS if one was drawn), then ``pad_id``.
    Deterministic for a given ``key``: step ``t`` draws with ``fold_in(key, t)``.
    """
    if c.model_type not in FAMILIES:
        raise UnsupportedModelError(f"generation does not support model_type {c.model_type!r}")
    if max_new_tokens < 1:
        raise ReplaceMeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ReplaceMeError("generation needs a non-empty prompt for every row")
    lengths = np.array([len(p) for p in prompts], np.int32)
    total = int(lengths.max()) + max_new_tokens
    if total > c.max_position_embeddings:
        log.warning("generating %d positions, past max_position_embeddings=%d", total, c.max_position_embeddings)
    tokens = np.full((len(prompts), total), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    eos = np.asarray(sorted(set(int(e) for e in eos_ids)) or [-1], np.int32)  # -1 never matches
    out, out_lengths = _generate_batch(
        params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(lengths + max_new_tokens), jnp.asarray(eos),
        key, c=c, prefix=int(lengths.min()), sampling=sampling, pad_id=int(pad_id), progress=progress)
    return np.asarray(out), np.asarray(out_lengths)


def start_token_id(tokenizer) -> int:
    """The token every self-generated sample starts from: BOS, else EOS (a document boundary)."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ReplaceMeError("the tokenizer has neither a BOS nor an EOS token to start generation from")
