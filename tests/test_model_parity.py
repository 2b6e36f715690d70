"""The JAX decoders equal `transformers` PyTorch on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from replaceme_jax.conversion import load_model
from replaceme_jax.models import family_for, llama
from tests.helpers import FAMILY_CONFIGS, make_model, random_batch, torch_logits

# float32 on both sides; the two frameworks sum in different orders, so logits of magnitude ~1-10
# differ by a few ulps per op over 3 layers: ~1e-6 observed, 1e-4 leaves margin for other BLAS builds.
ATOL = 1e-4


def jax_logits(model, ids, mask):
    with jax.default_matmul_precision("highest"):
        return np.asarray(family_for(model.config.model_type).forward(model.params, model.config, ids, mask).logits)


@pytest.mark.parametrize("query_block", [None, 5])
@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_logits_match_transformers_with_right_padding(tmp_path, name, query_block, monkeypatch):
    """``query_block`` 5: the whole-sequence attention in three blocks of queries (12 = 5 + 5 + 2), so
    that its causal prefixes and windows meet every family's masks."""
    from replaceme_jax.models import attention

    if query_block is not None:
        monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    model_type, overrides = FAMILY_CONFIGS[name]
    reference = make_model(tmp_path, model_type, tokenizer=False, **overrides)
    model = load_model(tmp_path)
    ids, mask = random_batch(model.config.vocab_size, [12, 7, 1, 12], seed=1)
    ours = jax_logits(model, ids, mask)
    theirs = torch_logits(reference, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=ATOL, rtol=0)


def test_logits_match_transformers_with_left_padding(tmp_path):
    reference = make_model(tmp_path, "llama", tokenizer=False, num_attention_heads=4, num_key_value_heads=2)
    model = load_model(tmp_path)
    ids, mask = random_batch(model.config.vocab_size, [9, 4, 9], seed=2, left=True)
    ours = jax_logits(model, ids, mask)
    theirs = torch_logits(reference, ids, mask)
    valid = mask.astype(bool)  # pad queries attend to nothing; their logits are meaningless on both sides
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=ATOL, rtol=0)


def test_collected_layer_outputs_match_transformers_hidden_states(tmp_path):
    reference = make_model(tmp_path, "qwen3", tokenizer=False, num_hidden_layers=4)
    model = load_model(tmp_path)
    ids, mask = random_batch(model.config.vocab_size, [10, 6], seed=3)
    with jax.default_matmul_precision("highest"):
        out = llama.forward(model.params, model.config, ids, mask, collect_layers=True, compute_logits=False)
    with torch.no_grad():
        hf = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       output_hidden_states=True).hidden_states
    valid = mask.astype(bool)
    assert out.logits is None
    assert len(out.hidden_states) == 5 and len(out.mlp_outputs) == 4
    # transformers' last hidden state is after the final norm; h_0..h_{L-1} are residual streams.
    for k in range(4):
        np.testing.assert_allclose(np.asarray(out.hidden_states[k])[valid], hf[k].numpy()[valid], atol=ATOL)
    for k in range(4):
        rebuilt = np.asarray(out.attn_residuals[k]) + np.asarray(out.mlp_outputs[k])
        np.testing.assert_allclose(rebuilt, np.asarray(out.hidden_states[k + 1]), atol=1e-6)


def test_num_layers_stops_early(tmp_path):
    make_model(tmp_path, "llama", tokenizer=False, num_hidden_layers=4)
    model = load_model(tmp_path)
    ids, mask = random_batch(model.config.vocab_size, [5], seed=4)
    full = llama.forward(model.params, model.config, ids, mask, collect_layers=True, compute_logits=False)
    two = llama.forward(model.params, model.config, ids, mask, num_layers=2, compute_logits=False)
    np.testing.assert_array_equal(np.asarray(two.hidden_states[-1]), np.asarray(full.hidden_states[2]))


def forward_with_explicit_map(params, config, ids, mask, start, end, T):
    """The unmerged model: layers before the block, ``h = Y + M T`` at layer ``start - 1``, the block
    skipped, the rest. Any family, through its own layer function."""
    family = family_for(config.model_type)
    ctx = family.attention_context(config, ids.shape, mask)
    h = family.embed(params, ids)
    for i, layer in enumerate(params["layers"]):
        if start <= i < end:
            continue
        h_next, y, m = family.decoder_layer(layer, config, i, h, ctx)
        h = y + m @ jnp.asarray(T, jnp.float32) if i == start - 1 else h_next
    return family.lm_head(params, config, family.final_norm(params, config, h))


@pytest.mark.parametrize("name", ["llama:llama_mha_untied_bias", "moe:mixtral", "moe:qwen2_moe_shared",
                                  "moe:olmoe_clip_bias"])
def test_fold_output_map_is_exact_merged_model_equals_explicit_map(tmp_path, name):
    """Folding T into the MLP branch (fold_output_map: down_proj with its bias; every routed expert's
    and the shared expert's down_proj) gives the model with ``M T`` applied explicitly."""
    from replaceme_jax.replaceme.merge import replace_block
    from tests.moe_helpers import MOE_CONFIGS, make_moe_model

    kind, key = name.split(":")
    if kind == "moe":
        model_type, overrides = MOE_CONFIGS[key]
        make_moe_model(tmp_path, model_type, **dict(overrides, num_hidden_layers=4))
    else:
        model_type, overrides = FAMILY_CONFIGS[key]
        make_model(tmp_path, model_type, tokenizer=False, **dict(overrides, num_hidden_layers=4))
    model = load_model(tmp_path)
    T = np.eye(32) + 0.1 * np.random.default_rng(0).standard_normal((32, 32))
    params, config = replace_block(model.params, model.config, 2, 3, T)
    ids, mask = random_batch(model.config.vocab_size, [16, 9], seed=1)
    with jax.default_matmul_precision("highest"):
        merged = family_for(config.model_type).forward(params, config, ids, mask).logits
        explicit = forward_with_explicit_map(model.params, model.config, ids, mask, 2, 3, T)
    valid = mask.astype(bool)
    # the two differ only by float32 rounding of (z W) T against z (W T)
    np.testing.assert_allclose(np.asarray(merged)[valid], np.asarray(explicit)[valid], atol=2e-5)
