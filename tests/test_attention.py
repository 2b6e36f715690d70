"""The one attention (models/attention.py): the einsum path against a plain per-head reference, and the
fused ``jax.nn.dot_product_attention`` mapping (causal, right padding, window) against the einsum path.
On CPU the fused call runs as ``implementation="xla"``; cuDNN takes the same arguments on GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaceme_jax.models import attention


def _inputs(b=2, s=12, hq=6, hkv=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, s, hq, hd)).astype(np.float32)
    k = rng.standard_normal((b, hkv, s, hd)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, hd)).astype(np.float32)
    lengths = np.array([s, s - 5])[:b]
    key_valid = np.arange(s)[None, :] < lengths[:, None]
    return q, k, v, key_valid, lengths


def _reference(q, k, v, key_valid, scale, window=None, cap=None):
    """Per-head loops in float64: query head j reads KV head j // groups."""
    b, s, hq, hd = q.shape
    groups = hq // k.shape[1]
    out = np.zeros((b, s, hq, hd))
    for r in range(b):
        for h in range(hq):
            scores = q[r, :, h].astype(np.float64) @ k[r, h // groups].T.astype(np.float64) * scale
            if cap is not None:
                scores = cap * np.tanh(scores / cap)
            i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
            allowed = (j <= i) & key_valid[r][None, :]
            if window is not None:
                allowed &= (i - j) < window
            scores = np.where(allowed, scores, -np.inf)
            with np.errstate(invalid="ignore"):  # fully masked padding queries: NaN, never compared
                probs = np.exp(scores - scores.max(-1, keepdims=True))
                out[r, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[r, h // groups]
    return out.reshape(b, s, hq * hd)


@pytest.mark.parametrize("window,cap", [(None, None), (4, None), (None, 5.0), (5, 5.0)])
@pytest.mark.parametrize("whole_sequence,query_block", [(False, attention.QUERY_BLOCK), (True, 64), (True, 4),
                                                        (True, 5)])
def test_einsum_attention_matches_per_head_reference(window, cap, whole_sequence, query_block):
    """Both einsum paths: the general one (KV cache, explicit positions) and the whole-sequence one in
    query blocks (one block; blocks of 4 that divide S = 12; blocks of 5, the last one short)."""
    q, k, v, key_valid, lengths = _inputs()
    pos = jnp.broadcast_to(jnp.arange(q.shape[1])[None, :], key_valid.shape)
    with jax.default_matmul_precision("highest"):
        out = attention.attend(q, k, v, scale=0.3, q_positions=pos, k_positions=pos, key_valid=key_valid,
                               window=window, logit_softcap=cap, implementation="einsum",
                               whole_sequence=whole_sequence, query_block=query_block)
    expected = _reference(q, k, v, key_valid, 0.3, window, cap)
    for r, n in enumerate(lengths):  # the valid queries of each row
        np.testing.assert_allclose(np.asarray(out)[r, :n], expected[r, :n], atol=1e-5)


def test_query_blocks_keep_an_empty_filler_row_finite():
    q, k, v, key_valid, _ = _inputs(s=40)
    key_valid[1] = False  # a last batch's filler row: no valid key at all
    pos = jnp.broadcast_to(jnp.arange(40)[None, :], key_valid.shape)
    out = np.asarray(attention.attend(q, k, v, scale=0.3, q_positions=pos, k_positions=pos, key_valid=key_valid,
                                      implementation="einsum", whole_sequence=True, query_block=4))
    assert np.isfinite(out).all()


def test_long_sequences_get_larger_query_blocks_not_more_of_them():
    assert attention.query_block_size(512) == attention.QUERY_BLOCK
    assert attention.query_block_size(40, 4) == 4
    assert attention.query_block_size(100_000) * attention.MAX_QUERY_BLOCKS >= 100_000
    assert attention.query_block_size(100_000) < 100_000 // (attention.MAX_QUERY_BLOCKS - 1)


@pytest.mark.parametrize("window", [None, 4])
def test_fused_call_maps_mask_padding_and_window_like_the_einsum_path(window):
    q, k, v, key_valid, lengths = _inputs(seed=1)
    pos = jnp.broadcast_to(jnp.arange(q.shape[1])[None, :], key_valid.shape)
    key_valid[1] = False  # an empty filler row: stays finite
    kwargs = dict(scale=0.3, q_positions=pos, k_positions=pos, key_valid=key_valid, window=window,
                  whole_sequence=True)
    with jax.default_matmul_precision("highest"):
        fused = np.asarray(attention.attend(q, k, v, implementation="xla", **kwargs))
        plain = np.asarray(attention.attend(q, k, v, implementation="einsum", **kwargs))
    assert np.isfinite(fused).all()
    np.testing.assert_allclose(fused[0], plain[0], atol=1e-5)


def test_fused_call_refuses_a_concrete_left_padded_mask():
    q, k, v, key_valid, _ = _inputs()
    pos = jnp.broadcast_to(jnp.arange(q.shape[1])[None, :], key_valid.shape)
    with pytest.raises(ValueError, match="right padding"):
        attention.attend(q, k, v, scale=0.3, q_positions=pos, k_positions=pos, key_valid=key_valid[:, ::-1],
                         whole_sequence=True, implementation="xla")


def test_auto_is_einsum_on_cpu_and_where_fusion_cannot_apply():
    assert attention.resolve_implementation("auto", jnp.bfloat16, None, True) == (
        "cudnn" if jax.default_backend() == "gpu" else "einsum")
    assert attention.resolve_implementation("auto", jnp.float32, None, True) == "einsum"
    assert attention.resolve_implementation("xla", jnp.float32, 50.0, True) == "einsum"  # soft-cap
    assert attention.resolve_implementation("xla", jnp.float32, None, False) == "einsum"  # KV cache
    with pytest.raises(ValueError, match="not one of"):
        attention.resolve_implementation("flash", jnp.float32, None, True)


def test_model_forward_with_the_fused_call_matches_einsum(tmp_path):
    """A whole model (right-padded batch, sliding-window layers) through ``implementation="xla"``."""
    import dataclasses

    from replaceme_jax.conversion import load_model
    from replaceme_jax.models import family_for
    from tests.helpers import make_model, random_batch

    make_model(tmp_path, "qwen2", tokenizer=False, num_hidden_layers=3, use_sliding_window=True,
               sliding_window=4, max_window_layers=1)
    model = load_model(tmp_path)
    assert "sliding_attention" in model.config.layer_types and model.config.sliding_window == 4
    ids, mask = random_batch(model.config.vocab_size, [16, 9], seed=2)
    family = family_for(model.config.model_type)
    with jax.default_matmul_precision("highest"):
        plain = np.asarray(family.forward(model.params, dataclasses.replace(
            model.config, attention_implementation="einsum"), ids, mask).logits)
        fused = np.asarray(family.forward(model.params, dataclasses.replace(
            model.config, attention_implementation="xla"), ids, mask).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(fused[valid], plain[valid], atol=1e-4)
