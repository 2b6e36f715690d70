"""refine: kl: the coarsened KL, its minimum, and the refinement inside compress."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaceme_jax.conversion import load_model
from replaceme_jax.data import make_batches
from replaceme_jax.models import family_for
from replaceme_jax.replaceme.merge import replace_block
from replaceme_jax.replaceme.pipeline import REFINE_MIN_RELATIVE_GAIN, compress
from replaceme_jax.replaceme.refine import (_coarse_log_probs, _teacher_top_k, batches_for_tokens, kl_loss,
                                           kl_loss_and_grad, refine_kl)
from replaceme_jax.replaceme.validation import _prefix
from tests.helpers import make_model
from tests.test_replaceme import run_config, zero_layers


@pytest.fixture(scope="module")
def identity_block_model(tmp_path_factory):
    """Layers 2 and 3 add nothing: dropping them with T = I is exact."""
    root = tmp_path_factory.mktemp("refine")
    make_model(root / "m", "llama", num_hidden_layers=6)
    zero_layers(root / "m", [2, 3])
    return load_model(str(root / "m"))


def batches(vocab=128, n=8, length=24, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(4, vocab, size=int(rng.integers(8, length))).astype(np.int32) for _ in range(n)]
    return make_batches(seqs, 4, length, 0)


def test_refinement_batches_stop_once_the_token_budget_is_reached():
    sequences = [np.arange(1, 1 + length) for length in (8, 8, 4, 4, 2, 2)]
    batches = list(make_batches(sequences, 2, 8, 0))  # 16, 8 and 4 real tokens
    counts = [int(np.asarray(b.attention_mask).sum()) for b in batches]
    assert counts == [16, 8, 4]
    assert batches_for_tokens(batches, 1) == batches[:1]  # at least one batch
    assert batches_for_tokens(batches, 16) == batches[:1]
    assert batches_for_tokens(batches, 17) == batches[:2]
    assert batches_for_tokens(batches, 10**6) == batches  # all there is


def test_coarse_kl_is_a_lower_bound_and_exact_with_every_token():
    rng = np.random.default_rng(0)
    p = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 40)) * 3))
    q = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 40)) * 3))
    full = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
    for k in (4, 16, 39):
        top, index = jax.lax.top_k(p, k)
        cp, cq = _coarse_log_probs(top), _coarse_log_probs(jnp.take_along_axis(q, index, axis=-1))
        coarse = jnp.sum(jnp.exp(cp) * (cp - cq), axis=-1)
        assert np.all(np.asarray(coarse) <= np.asarray(full) + 1e-6)
    top, index = jax.lax.top_k(p, 40)
    cp, cq = _coarse_log_probs(top), _coarse_log_probs(jnp.take_along_axis(q, index, axis=-1))
    np.testing.assert_allclose(np.asarray(jnp.sum(jnp.exp(cp) * (cp - cq), axis=-1)), np.asarray(full), atol=1e-4)


def _loss(model, T, batch, start=2, end=4, k=32):
    params, config = model.params, model.config
    pruned, pruned_config = replace_block(params, config, start, end, None)
    ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
    y, m = _prefix(params, ids, mask, config=config, start=start)
    top, index = _teacher_top_k(params, ids, mask, config=config, k=k)
    return float(kl_loss(pruned, jnp.asarray(T, jnp.float32), y, m, mask, top, index, mask > 0,
                         config=pruned_config, start=start))


def test_kl_is_zero_where_T_reproduces_the_original(identity_block_model):
    batch = next(iter(batches()))
    with jax.default_matmul_precision("highest"):
        assert _loss(identity_block_model, np.eye(32), batch) == pytest.approx(0.0, abs=1e-6)
        assert _loss(identity_block_model, 0.3 * np.eye(32), batch) > 1e-3


def test_refinement_moves_a_spoilt_T_back_towards_the_original(identity_block_model):
    model = identity_block_model
    spoilt = 0.5 * np.eye(32)
    with jax.default_matmul_precision("highest"):
        result = refine_kl(model.params, model.config, model.params, model.config, 2, 4, spoilt, batches(),
                           steps=60, lr=1e-2, top_k=32, progress=False)
        before = np.mean([_loss(model, spoilt, b) for b in batches(seed=1)])
        after = np.mean([_loss(model, result.T, b) for b in batches(seed=1)])  # unseen batches
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert after < 0.5 * before
    assert np.linalg.norm(result.T - np.eye(32)) < np.linalg.norm(spoilt - np.eye(32))


def test_refinement_caches_only_the_batches_its_steps_use(identity_block_model):
    model, spoilt = identity_block_model, 0.5 * np.eye(32)
    every = list(batches(n=16))  # 4 batches, 3 steps: the last is never stepped on
    used = every[:3]
    with jax.default_matmul_precision("highest"):
        results = [refine_kl(model.params, model.config, model.params, model.config, 2, 4, spoilt, given,
                             steps=3, lr=1e-2, top_k=32, progress=False) for given in (every, used)]
    real_tokens = [int(np.asarray(b.attention_mask).sum()) for b in every]
    assert results[0].tokens == sum(real_tokens[:3]) < sum(real_tokens)
    np.testing.assert_array_equal(results[0].T, results[1].T)
    assert results[0].losses == results[1].losses


def test_compress_with_refine_records_it_and_keeps_T_only_if_heldout_improves(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    result = compress(run_config(tmp_path, tmp_path / "m", refine="kl", refine_steps=5, refine_lr=1e-3,
                                 fallback="none"))
    block = result.report["block_results"][0]
    record = block["solver"]["refine"]
    assert record["steps"] == 5 and record["tokens"] > 0 and np.isfinite(record["kl_last"])
    gain_needed = record["perplexity_before"] * (1 - REFINE_MIN_RELATIVE_GAIN)
    assert record["kept"] == (record["perplexity_after"] < gain_needed)
    final = block["validation"]["perplexity_with_T"]
    assert final == pytest.approx(record["perplexity_after"] if record["kept"] else record["perplexity_before"])


def test_chunked_teacher_and_loss_equal_the_whole_batch_at_once(identity_block_model):
    """Chunks of 7 positions (which do not divide the batch's; the last one is padded) and rows taken in
    groups change the memory, not the teacher's top k, the loss or its gradient in T."""
    params, config = identity_block_model.params, identity_block_model.config
    pruned, pruned_config = replace_block(params, config, 2, 4, None)
    batch = next(iter(batches()))
    ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
    assert ids.size % 7 != 0
    with jax.default_matmul_precision("highest"):
        y, m = _prefix(params, ids, mask, config=config, start=2)
        whole = _teacher_top_k(params, ids, mask, config=config, k=16, chunk=10**6)
        chunked = _teacher_top_k(params, ids, mask, config=config, k=16, chunk=7)
        logits = family_for(config.model_type).forward(params, config, ids, mask).logits
        np.testing.assert_allclose(np.asarray(whole[0]), np.asarray(jax.lax.top_k(jax.nn.log_softmax(logits), 16)[0]),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(whole[0]), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(chunked[1]), np.asarray(whole[1]))
        T = jnp.asarray(0.7 * np.eye(32) + 0.01 * np.random.default_rng(0).normal(size=(32, 32)), jnp.float32)

        def loss(T, chunk):
            return kl_loss(pruned, T, y, m, mask, *whole, mask > 0, config=pruned_config, start=2, chunk=chunk)

        (value_whole, grad_whole), (value_chunked, grad_chunked) = (
            jax.value_and_grad(loss)(T, chunk) for chunk in (10**6, 7))
        # the step's form: rows in groups (of 1 and of 2 here, a batch of 4 rows), the sums carried between them
        grouped = [kl_loss_and_grad(pruned, T, y, m, mask, *whole, mask > 0, config=pruned_config, start=2,
                                    tokens_at_once=tokens) for tokens in (1, 2 * ids.shape[1])]
    assert float(value_whole) > 1e-3
    np.testing.assert_allclose(float(value_chunked), float(value_whole), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_chunked), np.asarray(grad_whole), rtol=1e-4, atol=1e-7)
    assert ids.shape[0] == 4
    for value, grad in grouped:
        np.testing.assert_allclose(float(value), float(value_whole), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_whole), rtol=1e-4, atol=1e-7)


def test_refinement_log_names_each_block_in_the_original_numbering(tmp_path, caplog):
    """The second block is refined on the model with the first removed, where it sits two layers lower; its
    log line still names it as the held-out line and the report do."""
    make_model(tmp_path / "m", "llama", num_hidden_layers=8)
    with caplog.at_level("INFO", logger="replaceme_jax"):
        result = compress(run_config(tmp_path, tmp_path / "m", blocks=[[1, 3], [5, 7]], num_A=2, refine="kl",
                                     refine_steps=2, fallback="none"))
    assert [b["block"] for b in result.report["block_results"]] == [[1, 3], [5, 7]]
    refined = [r.getMessage().split(" refine kl")[0] for r in caplog.records if " refine kl: " in r.getMessage()]
    assert refined == ["block (1, 3)", "block (5, 7)"]
