"""Damage against a reference (``evaluate --reference``): KL(reference || model) of the next-token
distributions and top-1 agreement, on exactly the tokens each task scores, streamed over the vocabulary."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replaceme_jax as rj
import replaceme_jax.evaluation as ev
from replaceme_jax import cli
from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.evaluation import scoring
from replaceme_jax.models import family_for, llama
from tests.helpers import hf_config, make_model
from tests.test_evaluate import make_data_dir, words
from tests.test_evaluate_issue17 import _intermediate_sizes

# The brief's bound on the mean KL per scored token, against float64 numpy on full float32 logits. Both
# sides read the same float32 logits up to the head's summation order (~1e-6 of logits of a few units);
# KL is three terms of that size, so ~1e-6 per token is expected and 1e-5 leaves margin.
KL_ATOL = 1e-5


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def full_logits(model, tokens: np.ndarray) -> np.ndarray:
    family = family_for(model.config.model_type)
    return np.asarray(family.forward(model.params, model.config, jnp.asarray(tokens[None])).logits[0], np.float32)


def brute_force(model, reference, requests, max_length):
    """Per request, from full logits of each unpadded sequence: (summed KL(reference || model) over the
    scored tokens, tokens whose argmaxes agree, tokens scored)."""
    out = []
    for context, continuation in requests:
        tokens = np.asarray(list(context) + list(continuation))[-(max_length + 1):]
        k = min(len(continuation), len(tokens) - 1)
        q, p = (full_logits(m, tokens[:-1])[-k:] for m in (model, reference))
        log_q, log_p = log_softmax64(q), log_softmax64(p)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        out.append((kl.sum(), int((q.argmax(-1) == p.argmax(-1)).sum()), k))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny model and a reference of another family, depth and width, sharing a vocabulary of 1003
    (no chunk below divides it) and a tokenizer."""
    model_dir, reference_dir = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("reference")
    make_model(model_dir, "llama", vocab_size=1003)
    make_model(reference_dir, "qwen2", seed=1, vocab_size=1003, hidden_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return load_model(model_dir), load_model(reference_dir), model_dir, reference_dir


def requests_for(seed: int):
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(4, 1003, n).tolist()  # noqa: E731
    # padding, a window cut on the left (70 > max_length), a one-token continuation, an empty last-batch row
    return [(ids(2), ids(1)), (ids(30), ids(3)), (ids(5), ids(40)), (ids(1), ids(1)), (ids(60), ids(10))]


def test_a_model_against_itself_has_zero_kl_and_full_top1_agreement(pair):
    model = pair[0]
    requests = requests_for(0)
    with jax.default_matmul_precision("highest"):
        alone = ev.score_requests(model.params, model.config, requests, max_length=40, batch_size=2)
        scores = ev.score_requests(model.params, model.config, requests, max_length=40, batch_size=2,
                                   reference=ev.Reference(model.params, model.config))
    # Both sides are the same float32 computation: the three KL terms cancel to rounding (clipped at 0).
    np.testing.assert_allclose(scores.kl, 0.0, atol=1e-6)
    np.testing.assert_array_equal(scores.top1, scores.num_tokens)
    # Comparing changes nothing in the model's own scores.
    np.testing.assert_allclose(scores.logprob, alone.logprob, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(scores.greedy, alone.greedy)
    assert alone.kl is None and alone.top1 is None


@pytest.mark.parametrize("chunk", [None, 128, 200, 1003])  # default, 7 chunks + tail 107, 5 + 3, one chunk
def test_kl_and_top1_agreement_equal_numpy_on_full_logits(pair, chunk):
    model, reference = pair[:2]
    requests = requests_for(1)
    with jax.default_matmul_precision("highest"):
        scores = ev.score_requests(model.params, model.config, requests, max_length=40, batch_size=2,
                                   vocab_chunk=chunk, reference=ev.Reference(reference.params, reference.config))
        expected = brute_force(model, reference, requests, 40)
    kl, agree, tokens = (np.array(column) for column in zip(*expected))
    np.testing.assert_array_equal(scores.num_tokens, tokens)
    assert np.all(kl > 0.01)  # two unrelated random models: far from each other
    np.testing.assert_allclose(scores.kl / tokens, kl / tokens, rtol=0, atol=KL_ATOL)
    np.testing.assert_array_equal(scores.top1, agree)


def test_a_slightly_perturbed_reference_agrees_on_some_tokens_and_not_others(pair):
    model = pair[0]
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    reference = dataclasses.replace(model, params=jax.tree_util.tree_unflatten(tree, noisy))
    requests = requests_for(2)
    with jax.default_matmul_precision("highest"):
        scores = ev.score_requests(model.params, model.config, requests, max_length=40, batch_size=2, vocab_chunk=200,
                                   reference=ev.Reference(reference.params, reference.config))
        expected = brute_force(model, reference, requests, 40)
    kl, agree, tokens = (np.array(column) for column in zip(*expected))
    assert 0 < agree.sum() < tokens.sum() and np.all(kl > 0)
    np.testing.assert_allclose(scores.kl / tokens, kl / tokens, rtol=0, atol=KL_ATOL)
    np.testing.assert_array_equal(scores.top1, agree)


def test_streamed_divergence_equals_numpy_on_logits_far_from_zero():
    rng = np.random.default_rng(2)
    q = rng.normal(0.0, 4.0, (37, 1003)).astype(np.float32)
    p = q + rng.normal(0.0, 1.0, q.shape).astype(np.float32)
    q[::5] += 40.0  # rows far from zero: the running maxima and rescaling must carry them
    p[1::5] -= 40.0
    p[3, 700], q[3, 5] = 90.0, 80.0  # maxima in different chunks
    targets = jnp.asarray(rng.integers(0, 1003, 37), jnp.int32)

    def sliced(x):
        return lambda start, size: jax.lax.dynamic_slice_in_dim(jnp.asarray(x), start, size, axis=1)

    logprob, is_top, kl, agree = jax.jit(lambda: ev.reference_divergence(sliced(q), sliced(p), 1003, targets, 128))()
    log_q, log_p = log_softmax64(q), log_softmax64(p)
    np.testing.assert_allclose(kl, (np.exp(log_p) * (log_p - log_q)).sum(-1), rtol=1e-5, atol=KL_ATOL)
    np.testing.assert_array_equal(agree, q.argmax(-1) == p.argmax(-1))
    assert not agree[3]
    expected_logprob = np.take_along_axis(log_q, np.asarray(targets)[:, None], -1)[:, 0]
    np.testing.assert_allclose(logprob, expected_logprob, rtol=0, atol=1e-4)  # logits up to ~50: a few ulps
    np.testing.assert_array_equal(is_top, q.argmax(-1) == np.asarray(targets))


def test_argmax_ties_go_to_the_lower_id_across_chunks():
    q = np.zeros((2, 300), np.float32)
    q[0, [10, 250]] = 5.0  # a tie across chunks: argmax takes 10
    q[1, [130, 131]] = 5.0  # a tie inside a chunk: 130
    p = np.zeros_like(q)
    p[0, 10], p[1, 131] = 5.0, 5.0

    def sliced(x):
        return lambda start, size: jax.lax.dynamic_slice_in_dim(jnp.asarray(x), start, size, axis=1)

    *_, agree = ev.reference_divergence(sliced(q), sliced(p), 300, jnp.zeros(2, jnp.int32), 128)
    np.testing.assert_array_equal(agree, [True, False])


def test_mc_kl_covers_every_choice_of_every_item(pair, tmp_path):
    model, reference = pair[:2]
    tokenizer = load_tokenizer(model)
    rng = np.random.default_rng(3)
    items = [ev.MultipleChoiceItem.from_choices(words(rng, 6), [words(rng, n) for n in (1, 3, 2)], 1)
             for _ in range(3)]
    with jax.default_matmul_precision("highest"):
        result = ev.multiple_choice(model.params, model.config, tokenizer, items, max_length=64, batch_size=4,
                                    reference=ev.Reference(reference.params, reference.config))
        pairs = [option for item in items for option in item.options]
        expected = brute_force(model, reference, ev.tokenize_pairs(tokenizer, pairs), 64)
    tokens = sum(k for _, _, k in expected)
    assert tokens == 3 * (1 + 3 + 2)  # one token a word: every choice's continuation, not only the gold one
    assert result.metrics["kl"] == pytest.approx(sum(kl for kl, _, _ in expected) / tokens, abs=KL_ATOL)
    assert result.metrics["top1_agreement"] == sum(a for _, a, _ in expected) / tokens
    assert list(result.metrics)[-3:] == ["kl", "top1_agreement", "n"]


def test_comparison_never_builds_batch_by_vocabulary_logits():
    # Qwen2's vocabulary on toy bodies, traced abstractly (no weights allocated), like the scoring check.
    def abstract(hidden):
        config = llama.config_from_hf(hf_config("qwen2", vocab_size=151_936, hidden_size=hidden, intermediate_size=32,
                                                num_hidden_layers=1, tie_word_embeddings=True).to_dict())
        params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                        llama.param_specs(config), is_leaf=lambda s: hasattr(s, "logical_axes"))
        return params, config

    (params, config), (ref_params, ref_config) = abstract(16), abstract(32)
    rows, length = 8, 1024
    batch = [jax.ShapeDtypeStruct((rows, length), dtype) for dtype in (jnp.int32, jnp.int32, jnp.int32, jnp.bool_)]
    chunk = ev.vocab_chunk_size(2 * rows * length, config.vocab_size, config.hidden_size + ref_config.hidden_size)
    compare = functools.partial(scoring._compare_batch, config=config, reference_config=ref_config, vocab_chunk=chunk)
    largest = max(_intermediate_sizes(jax.make_jaxpr(compare)(params, ref_params, *batch).jaxpr))

    def forward_only(params, ids, mask, *_):
        return llama.forward(params, ref_config, ids, mask, compute_logits=False).hidden_states[-1]

    forward = max(_intermediate_sizes(jax.make_jaxpr(forward_only)(ref_params, *batch).jaxpr))
    # One model's [tokens, chunk] block is at most half the budget, so both together stay under it.
    assert largest <= max(forward, ev.LOGITS_CHUNK_BYTES // 4 // 2) < rows * length * config.vocab_size


def test_a_reference_with_another_vocabulary_is_refused_in_one_line(pair, tmp_path, capsys):
    model, _, model_dir, _ = pair
    other = tmp_path / "other"
    make_model(other, "llama", vocab_size=1000)
    small = load_model(other)
    with pytest.raises(ReplaceMeError, match="vocabulary of 1000 tokens and the model 1003"):
        ev.score_requests(model.params, model.config, [([5], [6])], reference=ev.Reference(small.params, small.config))
    text = tmp_path / "t.txt"
    text.write_text(words(np.random.default_rng(4), 40))
    capsys.readouterr()  # what building the models printed
    code = cli.main(["evaluate", "--model", str(model_dir), "--reference", str(other), "--tasks", f"ppl:{text}",
                     "--max-length", "16", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "vocabulary of 1003 tokens, the reference" in err and "has 1000" in err


def test_cli_reference_adds_kl_and_top1_agreement_to_every_scoring_task(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    make_model(first, "llama")
    make_model(second, "llama", seed=1, num_hidden_layers=2)
    data = make_data_dir(tmp_path / "eval", np.random.default_rng(5))
    out = tmp_path / "report" / "eval.json"
    tasks = "wikitext2,arc_easy,lambada_openai,gen_exact"
    code = cli.main(["evaluate", "--model", str(first), "--model", str(second), "--reference", str(first),
                     "--tasks", tasks, "--data-dir", str(data), "--limit", "2", "--max-length", "32",
                     "--batch-size", "2", "--output", str(out), "-q"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["reference"] == str(first)
    for name in ("first", "second"):
        results = report["models"][name]["results"]
        for task in ("wikitext2", "arc_easy", "lambada_openai"):
            assert {"kl", "top1_agreement"} <= set(results[task]), (name, task)
        assert "kl" not in results["gen_exact"]  # greedy generation scores no tokens
    own = report["models"]["first"]["results"]
    assert all(own[t]["kl"] <= 1e-6 and own[t]["top1_agreement"] == 1.0 for t in ("wikitext2", "arc_easy"))
    other = report["models"]["second"]["results"]
    assert all(other[t]["kl"] > 0.01 and other[t]["top1_agreement"] < 1.0 for t in ("wikitext2", "arc_easy"))
    table = capsys.readouterr().out
    assert "| wikitext2 (n=2) | kl |" in table and "| arc_easy (n=2) | top1_agreement |" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # The API takes the same reference and scores the same tokens.
    again = rj.evaluate([second], "wikitext2", reference=first, data_dir=data, limit=2, max_length=32, batch_size=2,
                        progress=False)
    assert again["models"]["second"]["results"]["wikitext2"]["kl"] == pytest.approx(other["wikitext2"]["kl"],
                                                                                     rel=1e-6)
