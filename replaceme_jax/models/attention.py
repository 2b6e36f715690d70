"""The one attention of every family: causal, grouped-query, with an optional sliding window and
logit soft-cap, over keys that are either the sequence itself or a KV cache.

Masks, windows and the cache layout live here and nowhere else. Two implementations:

- ``einsum``: scores in float32. Any positions, any padding, soft-caps, and the KV cache. Over a whole
  sequence (``whole_sequence``) the queries go in blocks of ``QUERY_BLOCK``, each against only the keys
  it can see (the causal prefix, and the window): about half the score work of the full ``S x S``,
  and each block's scores stay in cache; the softmax is normalised after the value product (one pass
  over the scores fewer). At SmolLM2's shapes (8 x 512) that is 2-3x faster on XLA:CPU than the whole
  ``[B, h, S, S]`` at once (BENCHMARKS.md, issue 14). Otherwise (a KV cache, explicit positions) one
  batched matmul per KV head, the queries of a KV head's group stacked along the sequence.
- ``jax.nn.dot_product_attention`` (``cudnn`` on GPU: a fused flash kernel that never materialises
  ``[B, h, S, S]``; ``xla`` runs the same call anywhere, which is how CPU tests check the mapping of
  causal mask, right padding and window onto its arguments). Only for a whole right-padded sequence
  numbered 0..S-1 and no soft-cap; ``auto`` picks it on GPU in bfloat16/float16 (cuDNN's flash
  attention takes no float32) and ``einsum`` everywhere else.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
# Queries per block of the whole-sequence einsum path: 64 was the fastest on XLA:CPU of 32/64/128 at S 512
# (head_dim 64 and 256) and of 64/128/256 at S 2048; at most MAX_QUERY_BLOCKS blocks, so that the unrolled
# program stays small for long sequences.
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 32
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_warned: set[str] = set()


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (identity for ``cap=None``)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def resolve_implementation(implementation: str, dtype, logit_softcap: float | None, whole_sequence: bool) -> str:
    """The implementation ``implementation`` ("auto" or a name) means for these inputs."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    fusable = whole_sequence and logit_softcap is None
    if implementation == "auto":
        return "cudnn" if fusable and jax.default_backend() == "gpu" and dtype in _FUSED_DTYPES else "einsum"
    if implementation != "einsum" and not fusable:
        reason = "soft-capped scores" if logit_softcap is not None else "a KV cache or explicit positions"
        if reason not in _warned:
            _warned.add(reason)
            log.warning("attention %s cannot take %s; using einsum there", implementation, reason)
        return "einsum"
    return implementation


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, q_positions: jax.Array,
           k_positions: jax.Array, key_valid: jax.Array | None = None, window: int | None = None,
           logit_softcap: float | None = None, whole_sequence: bool = False,
           implementation: str = "auto", query_block: int | None = None) -> jax.Array:
    """Causal attention of queries ``q`` [B, S, hq, hd] (rope applied) over keys and values
    ``k``, ``v`` [B, hkv, T, hd] (the KV-cache layout; hq a multiple of hkv, query head j*groups+g
    reads KV head j, as in transformers). Returns ``[B, S, hq * hd]``.

    A key is seen when ``k_pos <= q_pos``, ``key_valid`` (default all) and, with ``window``,
    ``q_pos - k_pos < window``. Positions are ``[B, S]``/``[B, T]`` or broadcastable ``[1, ...]``.
    ``whole_sequence`` says the keys are the queries' own sequence, numbered 0..S-1 and right-padded
    (``key_valid`` a prefix of each row): only then may a fused kernel run.
    """
    impl = resolve_implementation(implementation, q.dtype, logit_softcap, whole_sequence)
    if impl != "einsum":
        return _fused(q, k, v, scale=scale, key_valid=key_valid, window=window, implementation=impl)
    if whole_sequence and q.shape[1] == k.shape[2]:
        return _causal_blocks(q, k, v, scale=scale, key_valid=key_valid, window=window,
                              logit_softcap=logit_softcap, query_block=query_block)
    b, s, hq, hd = q.shape
    hkv, t = k.shape[1], k.shape[2]
    groups = hq // hkv
    q = q.reshape(b, s, hkv, groups, hd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, groups * s, hd)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = softcap(scores, logit_softcap).reshape(b, hkv, groups, s, t)
    # in a cache, k_pos <= q_pos also hides the slots not written yet
    scores = _hide(scores, _visible(q_positions[:, :, None], k_positions[:, None, :], key_valid, window))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, groups * s, t)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v).reshape(b, hkv, groups, s, hd)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, hq * hd)


def _visible(q_pos, k_pos, key_valid, window):
    """``[B or 1, S, T]``: whether each query sees each key, from positions ``[.., S, 1]`` and ``[.., 1, T]``
    (numpy or jax) and ``key_valid`` ``[B, T]``."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((q_pos - k_pos) < window)
    if key_valid is not None:
        allowed = jnp.asarray(allowed) & key_valid[:, None, :]
    return allowed


def _hide(scores, allowed):
    """``scores`` ``[B, hkv, groups, S, T]`` with the keys ``allowed`` does not show set to a finite floor,
    which keeps fully masked rows (left padding, empty filler rows) finite instead of NaN."""
    return jnp.where(jnp.asarray(allowed)[:, None, None], scores, jnp.finfo(jnp.float32).min)


def query_block_size(length: int, query_block: int | None = None) -> int:
    """Queries per block over a sequence of ``length``: ``query_block`` (default ``QUERY_BLOCK``), or more
    when that would make more than ``MAX_QUERY_BLOCKS`` blocks."""
    return max(query_block or QUERY_BLOCK, -(-length // MAX_QUERY_BLOCKS))


def _causal_blocks(q, k, v, *, scale, key_valid, window, logit_softcap, query_block):
    """``attend`` over a whole sequence (positions 0..S-1 for queries and keys): each block of queries
    against the keys it can see, ``[max(0, lo - window + 1), hi)``."""
    b, s, hq, hd = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    block = query_block_size(s, query_block)
    qg = q.reshape(b, s, hkv, groups, hd).transpose(0, 2, 3, 1, 4)  # [B, hkv, groups, S, hd]
    outs = []
    for lo in range(0, s, block):
        hi = min(lo + block, s)
        k_lo = 0 if window is None else max(0, lo - window + 1)
        # the positions are static here, so the causal/window part of the mask is a constant
        allowed = _visible(np.arange(lo, hi)[None, :, None], np.arange(k_lo, hi)[None, None, :],
                           None if key_valid is None else key_valid[:, k_lo:hi], window)
        scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg[:, :, :, lo:hi], k[:, :, k_lo:hi],
                            preferred_element_type=jnp.float32) * scale
        scores = _hide(softcap(scores, logit_softcap), allowed)
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("bhgqk,bhkd->bhgqd", weights.astype(v.dtype), v[:, :, k_lo:hi],
                         preferred_element_type=jnp.float32)
        outs.append((out / total).astype(v.dtype))
    out = jnp.concatenate(outs, axis=3)  # [B, hkv, groups, S, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, hq * hd)


def _fused(q, k, v, *, scale, key_valid, window, implementation):
    b, s, hq, hd = q.shape
    lengths = None
    if key_valid is not None and not isinstance(key_valid, jax.core.Tracer):
        # eager callers (a module called outside jit) are checked; the pipelines pad on the right
        valid = np.asarray(key_valid, bool)
        if (np.diff(valid.astype(np.int8), axis=-1) > 0).any():
            raise ValueError("fused attention needs right padding (the attention mask a prefix of ones in each row); "
                             "pad on the right or use attention_implementation='einsum'")
    if key_valid is not None:
        # right padding: the valid keys are a prefix; an empty filler row still sees its first key,
        # so its (ignored) output stays finite
        lengths = jnp.maximum(jnp.sum(key_valid, axis=-1, dtype=jnp.int32), 1)
    out = jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=scale, is_causal=True,
        key_value_seq_lengths=lengths, local_window_size=(window - 1, 0) if window is not None else None,
        implementation=implementation)
    return out.reshape(b, s, hq * hd)
