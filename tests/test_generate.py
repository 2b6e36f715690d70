"""Self-generated calibration data: the KV-cached sampler against full forward passes and `transformers`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.data import decode_samples, sample_texts
from replaceme_jax.generate import Sampling, generate, nucleus_mask, sample_logits
from tests.helpers import FAMILY_CONFIGS, make_model
from tests.moe_helpers import MOE_CONFIGS, make_moe_model

GREEDY = Sampling(temperature=0.0)
PROMPTS = [[1], [1, 9, 10, 11], [1, 12]]  # different lengths: prefill of the shared prefix, then forced tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    reference = make_model(path, "llama", num_attention_heads=4, num_key_value_heads=2)
    model = load_model(path)
    return model, load_tokenizer(model), reference


def greedy_by_full_forward(model, prompts, max_new_tokens):
    """Greedy decoding that re-runs the family's forward on the whole growing sequences at every step."""
    width = max(len(p) for p in prompts) + max_new_tokens
    forward = jax.jit(lambda ids, mask: model.family.forward(model.params, model.config, ids, mask).logits)
    seqs = [list(p) for p in prompts]
    for _ in range(max_new_tokens):
        ids = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), np.int32)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1  # right padding is exact for real positions
        logits = np.asarray(forward(ids, mask))
        for row, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[row, len(seq) - 1])))
    return seqs


# Every attention variant the cache path implements: GQA/MQA/MHA, biases, untied head, qk-norm, sliding
# windows for all or some layers. (Linear rope differs from llama3 rope only in `inv_freq`.)
CACHE_FAMILIES = sorted(set(FAMILY_CONFIGS) - {"llama_linear_rope"})


@pytest.mark.parametrize("name", CACHE_FAMILIES + [f"moe:{name}" for name in MOE_CONFIGS])
def test_cached_greedy_equals_full_forward_and_transformers_generate(tmp_path, name):
    if name.startswith("moe:"):  # routed experts (and olmoe's full-width q/k norm and clipping) in the cache path
        model_type, overrides = MOE_CONFIGS[name[4:]]
        reference = make_moe_model(tmp_path, model_type, **overrides)
    else:
        model_type, overrides = FAMILY_CONFIGS[name]
        reference = make_model(tmp_path, model_type, tokenizer=False, **overrides)
    model = load_model(tmp_path)
    # 20 new tokens pass the sliding windows (4-5 tokens) of the sliding families.
    tokens, lengths = generate(model.params, model.config, PROMPTS, 20, jax.random.key(0), sampling=GREEDY,
                               eos_ids=[2], pad_id=0)
    full = greedy_by_full_forward(model, PROMPTS, 20)
    for row, prompt in enumerate(PROMPTS):
        ours = tokens[row, : lengths[row]].tolist()
        # Without an EOS the row runs to its limit; with one it ends right after it.
        assert lengths[row] == len(prompt) + 20 or ours[-1] == 2
        assert (tokens[row, lengths[row] :] == 0).all()
        assert ours == full[row][: lengths[row]]
    # transformers, on the longest prompt (its own prefill) only: a torch generate call is slow on CPU.
    row = 1
    with torch.no_grad():
        theirs = reference.generate(input_ids=torch.tensor([PROMPTS[row]]), do_sample=False, max_new_tokens=20,
                                    attention_mask=torch.ones(1, len(PROMPTS[row]), dtype=torch.long),
                                    eos_token_id=2, pad_token_id=0)
    # transformers also stops a single row at EOS, so the whole outputs, lengths included, agree.
    assert tokens[row, : lengths[row]].tolist() == theirs[0].tolist()


def test_generation_stops_at_eos_and_pads_after_it(tiny):
    model, _, _ = tiny
    free, _ = generate(model.params, model.config, PROMPTS, 16, jax.random.key(0), sampling=GREEDY)
    # Declare the token greedy decoding of row 0 produces at position 5 to be EOS: row 0 must stop there.
    eos = int(free[0, 5])
    tokens, lengths = generate(model.params, model.config, PROMPTS, 16, jax.random.key(0), sampling=GREEDY,
                               eos_ids=[eos], pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        generated = free[row, len(prompt) : len(prompt) + 16].tolist()
        expected = len(prompt) + (generated.index(eos) + 1 if eos in generated else 16)
        assert lengths[row] == expected
        np.testing.assert_array_equal(tokens[row, : lengths[row]], free[row, : lengths[row]])
        assert (tokens[row, lengths[row] :] == 0).all()
    assert lengths[0] <= 6


def test_min_new_tokens_defers_eos(tiny):
    model, _, _ = tiny
    free, _ = generate(model.params, model.config, PROMPTS, 16, jax.random.key(0), sampling=GREEDY)
    eos = int(free[0, 2])
    _, lengths = generate(model.params, model.config, PROMPTS, 16, jax.random.key(0), eos_ids=[eos],
                          sampling=Sampling(temperature=0.0, min_new_tokens=8))
    assert lengths[0] >= 1 + 8


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (64, 300)) * 3
    greedy = np.argmax(np.asarray(logits), axis=-1)
    for sampling in (Sampling(top_k=1), Sampling(top_p=1e-6)):
        drawn = sample_logits(logits, jax.random.key(1), sampling)
        np.testing.assert_array_equal(np.asarray(drawn), greedy)


def test_top_k_and_top_p_only_draw_from_their_sets():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 2000)
    top2 = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Sampling(top_k=2)))(keys))
    assert set(top2.ravel().tolist()) == {0, 1}
    # 0.5 + 0.3 = 0.8 reaches top_p=0.75 after two tokens; 0.5 alone does not.
    nucleus = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Sampling(top_p=0.75)))(keys))
    assert set(nucleus.ravel().tolist()) == {0, 1}
    assert np.asarray(nucleus_mask(jnp.exp(logits), 0.5)).tolist() == [[True, False, False, False]]
    assert np.asarray(nucleus_mask(jnp.exp(logits), 0.81)).tolist() == [[True, True, True, False]]


def test_sampling_is_deterministic_per_seed(tiny):
    model, tokenizer, _ = tiny
    kwargs = dict(num_samples=5, max_new_tokens=12, batch_size=2, temperature=1.0)
    first = sample_texts(model.params, model.config, tokenizer, seed=7, **kwargs)
    again = sample_texts(model.params, model.config, tokenizer, seed=7, **kwargs)
    other = sample_texts(model.params, model.config, tokenizer, seed=8, **kwargs)
    assert len(first) == 5  # 3 batches of 2, the filler row of the last one dropped
    assert all(a.tolist() == b.tolist() for a, b in zip(first, again))
    assert any(a.tolist() != b.tolist() for a, b in zip(first, other))
    for sample in first:
        assert sample.dtype == np.int32 and sample[0] == tokenizer.bos_token_id and 2 <= len(sample) <= 13
        # EOS may only appear as the last token.
        assert tokenizer.eos_token_id not in sample[:-1].tolist()


def test_seed_prompts_start_the_samples(tiny):
    model, tokenizer, _ = tiny
    samples = sample_texts(model.params, model.config, tokenizer, num_samples=4, max_new_tokens=12, batch_size=2,
                           seed=0, prompts=["the city", "a river of music"])
    prefixes = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in ["the city", "a river of music"]]
    for i, sample in enumerate(samples):
        prefix = prefixes[i % 2]
        assert sample[: len(prefix)].tolist() == prefix
    texts = decode_samples(tokenizer, samples)
    assert texts[0].startswith("the city") and texts[1].startswith("a river of music")
