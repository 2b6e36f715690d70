"""Issue 17: the evaluator never holds full-vocabulary logits yet scores exactly as before, takes
per-task limits, and shows greedy generations (``--generate``, the bundled ``gen_exact`` task)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import replaceme_jax.evaluation as ev
from replaceme_jax import cli
from replaceme_jax.evaluation import generation as gen, scoring
from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.errors import UsageError
from replaceme_jax.models import family_for, llama
from tests.helpers import FAMILY_CONFIGS, hf_config, make_model
from tests.test_evaluate import make_data_dir, torch_greedy_tokens, words, write_jsonl

EPS32 = float(np.finfo(np.float32).eps)


def full_logits_scores(params, config, tokens: np.ndarray, n_targets: int) -> tuple[float, bool]:
    """The pre-issue-17 definition on one unpadded sequence: full logits, ``jax.nn.log_softmax``."""
    logits = family_for(config.model_type).forward(params, config, jnp.asarray(tokens[None, :-1])).logits[0]
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = jnp.asarray(tokens[1:])
    picked = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[-n_targets:, 0]
    greedy = jnp.all(jnp.argmax(logits, axis=-1)[-n_targets:] == targets[-n_targets:])
    return float(picked.sum()), bool(greedy)


# ---------------------------------------------------------------------------------------------
# The streamed log-softmax


@pytest.mark.parametrize("vocab", [1, 7, 128, 1003])
@pytest.mark.parametrize("chunk", [1, 7, 128, 1000, 4096])
def test_streamed_log_softmax_equals_jax_log_softmax(vocab, chunk):
    rng = np.random.default_rng(vocab * 10_000 + chunk)
    logits = rng.normal(0.0, 4.0, (37, vocab)).astype(np.float32)
    logits[::5] += 40.0  # rows far from zero: the running maximum and rescaling must carry them
    logits[1::5] -= 40.0
    targets = rng.integers(0, vocab, 37)
    targets[::2] = logits[::2].argmax(-1)  # half the rows: the target is the maximum
    x, t = jnp.asarray(logits), jnp.asarray(targets, jnp.int32)

    @jax.jit
    def streamed(x, t):
        return ev.target_logprobs(lambda start, size: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1),
                                  vocab, t, chunk)

    logprob, is_top = streamed(x, t)
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(x, axis=-1)), targets[:, None], -1)[:, 0]
    # Both sides round in float32: a few ulps of the largest logit and of log(vocab).
    tolerance = 8 * EPS32 * (np.abs(logits).max() + np.log(vocab) + 1)
    np.testing.assert_allclose(np.asarray(logprob), expected, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(np.asarray(is_top), logits.argmax(-1) == targets)


def test_vocab_chunk_keeps_logits_and_head_slice_under_the_budget_whatever_the_vocabulary():
    budget = ev.LOGITS_CHUNK_BYTES
    for tokens in (1, 256, 8 * 1024, 64 * 1024):
        for vocab in (1000, 32_000, 151_936, 262_144, 1_000_000):
            for hidden in (0, 896, 4096):
                chunk = ev.vocab_chunk_size(tokens, vocab, hidden)
                assert chunk == vocab or chunk % ev.MIN_VOCAB_CHUNK == 0
                assert chunk == min(vocab, ev.MIN_VOCAB_CHUNK) or 4 * chunk * (tokens + hidden) <= budget
    assert ev.vocab_chunk_size(8 * 1024, 151_936, 896) == 1792  # 85 chunks for Qwen2's vocabulary


def _intermediate_sizes(jaxpr) -> list[int]:
    """Element counts of every value a jaxpr (and every jaxpr nested in it) computes."""
    sizes = []
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _intermediate_sizes(inner)
    return sizes


@pytest.mark.parametrize("tied", [True, False])
def test_scoring_never_builds_batch_by_vocabulary_logits(tied):
    # A Qwen2-sized vocabulary on a toy body, traced abstractly (no weights allocated).
    config = llama.config_from_hf(hf_config("qwen2", vocab_size=151_936, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, tie_word_embeddings=tied).to_dict())
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), llama.param_specs(config),
                                    is_leaf=lambda s: hasattr(s, "logical_axes"))
    rows, length = 8, 1024
    batch = [jax.ShapeDtypeStruct((rows, length), dtype) for dtype in (jnp.int32, jnp.int32, jnp.int32, jnp.bool_)]
    full_logits = rows * length * config.vocab_size

    def largest(fn):
        return max(_intermediate_sizes(jax.make_jaxpr(fn)(params, *batch).jaxpr))

    def score(chunk):
        return functools.partial(scoring._score_batch, config=config, vocab_chunk=chunk)

    def forward_only(params, ids, mask, *_):  # the model's own activations (attention scores are the largest)
        return llama.forward(params, config, ids, mask, compute_logits=False).hidden_states[-1]

    chunk = ev.vocab_chunk_size(rows * length, config.vocab_size, config.hidden_size)
    # Scoring adds nothing bigger than the forward pass's own activations or the chunk budget.
    assert largest(score(chunk)) <= max(largest(forward_only), ev.LOGITS_CHUNK_BYTES // 4) < full_logits
    assert largest(score(config.vocab_size)) >= full_logits  # the check sees full logits when they are there


# ---------------------------------------------------------------------------------------------
# Scoring through the model equals the full-logits path


@pytest.fixture(scope="module", params=[
    ("llama", dict(tie_word_embeddings=True)), ("llama", dict(tie_word_embeddings=False)),
    FAMILY_CONFIGS["gemma2_softcap"],  # tied, final logit soft cap: applied per chunk, per logit
], ids=["llama_tied", "llama_untied", "gemma2_softcap"])
def vocab1003(request, tmp_path_factory):
    """A tiny model whose vocabulary (1003) no chunk below divides."""
    directory = tmp_path_factory.mktemp("v1003")
    model_type, overrides = request.param
    make_model(directory, model_type, **{**overrides, "vocab_size": 1003})
    return load_model(directory)


def test_chunked_scores_equal_full_logits_across_padding_and_chunks(vocab1003):
    model = vocab1003
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(4, 1003, n).tolist()  # noqa: E731
    requests = [(ids(2), ids(1)), (ids(30), ids(3)), (ids(5), ids(40)), (ids(1), ids(1)), (ids(12), ids(7))]
    max_length = 40
    with jax.default_matmul_precision("highest"):
        expected = []
        for context, continuation in requests:
            tokens = np.asarray(context + continuation)[-(max_length + 1):]
            expected.append(full_logits_scores(model.params, model.config, tokens, min(len(continuation),
                                                                                      len(tokens) - 1)))
        for chunk in (None, 128, 200, 1003):  # default, 7 full chunks + a tail of 107, 5 + 3, one chunk
            # batch_size 2: rows padded on the right, and an empty row in the last batch
            scores = ev.score_requests(model.params, model.config, requests, max_length=max_length, batch_size=2,
                                       vocab_chunk=chunk)
            logprob = np.array([lp for lp, _ in expected])
            # float32 on both sides, summed over up to 40 tokens: 1e-5 relative with margin (observed ~1e-7).
            np.testing.assert_allclose(scores.logprob, logprob, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}")
            np.testing.assert_array_equal(scores.greedy, [g for _, g in expected])


# ---------------------------------------------------------------------------------------------
# Per-task limits


TASKS = ["wikitext2", "arc_easy", "ppl:/data/a=b.txt"]


@pytest.mark.parametrize("spec, expected", [
    (None, {"wikitext2": None, "arc_easy": None, "ppl:/data/a=b.txt": None}),
    ("16", {"wikitext2": 16, "arc_easy": 16, "ppl:/data/a=b.txt": 16}),
    (16, {"wikitext2": 16, "arc_easy": 16, "ppl:/data/a=b.txt": 16}),
    ("wikitext2=16,arc_easy=200", {"wikitext2": 16, "arc_easy": 200, "ppl:/data/a=b.txt": None}),
    ("100, wikitext2=8", {"wikitext2": 8, "arc_easy": 100, "ppl:/data/a=b.txt": 100}),
    ("ppl:/data/a=b.txt=3", {"wikitext2": None, "arc_easy": None, "ppl:/data/a=b.txt": 3}),
    ({"arc_easy": 5}, {"wikitext2": None, "arc_easy": 5, "ppl:/data/a=b.txt": None}),
])
def test_limits_per_task(spec, expected):
    assert ev.parse_limits(spec, TASKS) == expected


@pytest.mark.parametrize("spec, message", [
    ("foo=3", "--limit names task 'foo', which is not in --tasks (wikitext2, arc_easy, ppl:/data/a=b.txt)"),
    ("wikitext=3", "did you mean 'wikitext2'?"),
    ("wikitext2=x", "'wikitext2=x': 'x' is not a whole number"),
    ("many", "'many' is not a whole number"),
    ("0", "--limit must be at least 1 (got 0)"),
    ("arc_easy=-2", "--limit must be at least 1 (got -2 for arc_easy)"),
    ("3,4", "two numbers for every task (3 and 4)"),
    ("arc_easy=1,arc_easy=2", "gives task 'arc_easy' twice"),
    ("=3", "'=3' names no task"),
    ("arc_easy=3,", "empty entry"),
    ("", "empty entry"),
])
def test_bad_limit_specs_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError) as info:
        ev.parse_limits(spec, TASKS)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_rejects_a_limit_for_an_unknown_task_before_loading_any_model(tmp_path, capsys):
    code = cli.main(["evaluate", "--model", str(tmp_path / "no-model"), "--tasks", "wikitext2,arc_easy",
                     "--limit", "foo=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--limit names task 'foo', which is not in --tasks (wikitext2, arc_easy)" in err
    assert cli.main(["evaluate", "--model", str(tmp_path / "no-model")]) == 2
    assert "nothing to evaluate: give --tasks" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Generation


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    reference = make_model(first, "llama", num_attention_heads=4, num_key_value_heads=2)
    make_model(second, "llama", seed=1, num_hidden_layers=2)
    return reference, first, second


def torch_continuation(reference, tokenizer, prompt: str, new_tokens: int) -> str:
    """transformers' greedy continuation (argmax each step), cut after the first EOS as ours is."""
    ids = gen.prompt_ids(tokenizer, prompt)
    new = torch_greedy_tokens(reference, ids, new_tokens)
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generate_writes_every_models_greedy_continuation_side_by_side(two_models, tmp_path, capsys):
    reference, first, second = two_models
    rng = np.random.default_rng(4)
    prompts = [words(rng, 2), words(rng, 9), "", words(rng, 5) + " |"]
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n   \n{prompts[3]}\n")
    out = tmp_path / "gen" / "report.json"
    code = cli.main(["evaluate", "--model", str(first), "--model", str(second), "--generate",
                     str(tmp_path / "prompts.txt"), "--max-new-tokens", "6", "--output", str(out), "-q"])
    assert code == 0
    report = json.loads(out.read_text())
    items = report["generation"]["items"]
    assert [i["prompt"] for i in items] == [prompts[0], prompts[1], prompts[3]]  # blank lines skipped
    assert report["generation"]["max_new_tokens"] == 6 and report["settings"]["tasks"] == []
    names = [first.name, second.name]
    assert all(list(i["continuations"]) == names for i in items)
    tokenizer = load_tokenizer(load_model(first))
    for item in items:
        assert item["continuations"][first.name] == torch_continuation(reference, tokenizer, item["prompt"], 6)
    assert report["models"][second.name]["timing"]["generate"]["new_tokens"] > 0
    assert not out.with_suffix(".png").exists()  # no task results, no chart
    printed = capsys.readouterr().out
    assert f"| prompt | {first.name} | {second.name} |" in printed
    assert f"| {prompts[1]} | {items[1]['continuations'][first.name]} |" in printed
    assert prompts[3].replace("|", "\\|") in printed  # a pipe in a prompt does not break the table


def test_exact_match_reads_the_first_line_ignoring_case_spaces_and_a_full_stop():
    assert gen.exact_match(" Paris\n\nQ: What is the capital of Peru?", "Paris")
    assert gen.exact_match(" paris.", "Paris") and gen.exact_match("\n  New   York!\n", "new york")
    assert not gen.exact_match(" Paris is", "Paris") and not gen.exact_match("", "Paris")


def test_bundled_gen_exact_ships_inside_the_package():
    task = ev.load_task("gen_exact", data_dir=None)
    assert task.kind == "generation" and len(task.items) == 30
    assert task.path.parent.parent.name == "replaceme_jax" and task.path.is_file()
    assert all(prompt.endswith("\nA:") and answer.strip() for prompt, answer in task.items)
    assert len(ev.load_task("gen_exact", limit=4).items) == 4


def test_generation_task_scores_greedy_exact_match(two_models, tmp_path):
    reference, first, _ = two_models
    model = load_model(first)
    tokenizer = load_tokenizer(model)
    rng = np.random.default_rng(5)
    prompts = [words(rng, n) for n in (3, 4, 6, 8)]
    right = [torch_continuation(reference, tokenizer, p, gen.EXACT_MATCH_NEW_TOKENS) for p in prompts[:3]]
    path = write_jsonl(tmp_path / "quiz.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, right)]
                       + [{"prompt": prompts[3], "answer": "certainly not this"}])
    task = ev.load_task(f"gen:{path}")
    result = ev.run_task(model.params, model.config, tokenizer, task)
    # lm-eval's standard error of 3 hits in 4: stdev([1, 1, 1, 0]) / sqrt(4) = 0.5 / 2
    assert result.metrics == {"exact_match": 0.75, "exact_match_stderr": pytest.approx(0.25, rel=1e-12), "n": 4}
    assert result.generations.texts[:3] == right and result.timing()["new_tokens"] > 0


def test_per_task_limits_reach_the_report(two_models, tmp_path):
    _, first, _ = two_models
    data = make_data_dir(tmp_path / "eval", np.random.default_rng(6))
    report = ev.run_evaluation([str(first)], "wikitext2,arc_easy,lambada_openai,gen_exact", data_dir=data,
                               limit="2,wikitext2=3,gen_exact=1", max_length=32, batch_size=2, progress=False)
    results = report["models"][first.name]["results"]
    assert {task: r["n"] for task, r in results.items()} == {"wikitext2": 3, "arc_easy": 2, "lambada_openai": 2,
                                                             "gen_exact": 1}
    assert report["settings"]["limits"] == {"wikitext2": 3, "arc_easy": 2, "lambada_openai": 2, "gen_exact": 1}
    assert len(report["models"][first.name]["outputs"]["gen_exact"]) == 1
    assert "| gen_exact (n=1) | exact_match |" in ev.markdown_table(report)
