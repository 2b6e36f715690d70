"""The JAX decoders equal `transformers` PyTorch on tiny random models."""

import jax
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


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_logits_match_transformers_with_right_padding(tmp_path, name):
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
