"""The evaluator scores exactly what `transformers` scores on the same tokens, and reads tasks strictly."""

import json
import math
import statistics

import jax
import numpy as np
import pytest
import torch

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax import cli
import replaceme_jax.evaluation as ev
from replaceme_jax.errors import ReplaceMeError, UsageError
from tests.helpers import WORDS, make_model

# float32 on both sides. Logits agree to ~1e-6 (test_model_parity, bound 1e-4); a log-probability is a
# logit minus a log-sum-exp, so each token may be off by twice that, and a sum over k tokens by k times
# more. Observed differences are ~1e-6 per token; the bound below is the worst case with margin.
PER_TOKEN_ATOL = 2e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    reference = make_model(directory, "llama", num_attention_heads=4, num_key_value_heads=2)
    model = load_model(directory)
    return reference, model, load_tokenizer(model), directory


def lm_eval_stderr(outcomes):
    """lm-evaluation-harness's ``mean_stderr``: the sample standard deviation over sqrt(n)."""
    return statistics.stdev([float(o) for o in outcomes]) / math.sqrt(len(outcomes))


def words(rng, n):
    return " ".join(rng.choice(WORDS[4:], n))


def torch_score(reference, context, continuation, max_length):
    """lm-eval's loglikelihood on token ids: (summed log-prob, greedy, scored tokens)."""
    tokens = (list(context) + list(continuation))[-(max_length + 1):]
    k = min(len(continuation), len(tokens) - 1)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([tokens[:-1]])).logits[0, -k:].double()
    targets = torch.tensor(tokens[-k:])
    logprob = torch.log_softmax(logits, -1)[torch.arange(k), targets].sum().item()
    return logprob, bool((logits.argmax(-1) == targets).all()), k


def torch_greedy_tokens(reference, context, n):
    tokens = list(context)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(reference(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(context):]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_continuation_loglikelihoods_equal_transformers_across_padding_truncation_and_batch_edges(tiny, batch_size):
    reference, model, _, _ = tiny
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(4, model.config.vocab_size, n).tolist()  # noqa: E731
    greedy_context = ids(9)
    requests = [
        (ids(2), ids(1)),
        (ids(40), ids(3)),  # 42 inputs: pads to the 48 cap, the other bucket is 32
        (ids(70), ids(2)),  # longer than max_length: the context loses tokens on the left
        (ids(5), ids(60)),  # even the continuation is cut: 48 of its tokens are scored
        (ids(1), ids(1)),
        (greedy_context, torch_greedy_tokens(reference, greedy_context, 3)),
        (ids(20), ids(4)),
    ]  # 7 requests: with 3 rows a batch, the last batch holds one request and two empty rows
    max_length = 48
    with jax.default_matmul_precision("highest"):
        scores = ev.score_requests(model.params, model.config, requests, max_length=max_length,
                                   batch_size=batch_size)
    expected = [torch_score(reference, c, t, max_length) for c, t in requests]
    np.testing.assert_array_equal(scores.num_tokens, [k for _, _, k in expected])
    error = np.abs(scores.logprob - [lp for lp, _, _ in expected])
    assert np.all(error <= PER_TOKEN_ATOL * scores.num_tokens), (error, scores.logprob)
    np.testing.assert_array_equal(scores.greedy, [g for _, g, _ in expected])
    assert scores.greedy[5] and scores.num_tokens[3] == max_length


def test_perplexity_equals_transformers_on_non_overlapping_windows(tiny):
    reference, model, tokenizer, _ = tiny
    text = words(np.random.default_rng(1), 150)  # one token a word: 4 full windows of 32, 22 tokens dropped
    with jax.default_matmul_precision("highest"):
        result = ev.perplexity(model.params, model.config, tokenizer, text, max_length=32, batch_size=3)
        limited = ev.perplexity(model.params, model.config, tokenizer, text, max_length=32, batch_size=3, limit=2)
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [tokens[i * 32:(i + 1) * 32] for i in range(4)]
    logprobs = [torch_score(reference, w[:1], w[1:], 32)[0] for w in windows]  # each window on its own, no BOS
    assert result.metrics["n"] == 4 and result.scores.num_tokens.sum() == 4 * 31
    # A perplexity is exp(mean NLL): a per-token error e moves it by a factor exp(e).
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-sum(logprobs) / 124), rel=PER_TOKEN_ATOL)
    assert limited.metrics["n"] == 2
    assert limited.metrics["perplexity"] == pytest.approx(math.exp(-sum(logprobs[:2]) / 62), rel=PER_TOKEN_ATOL)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data_dir(directory, rng):
    directory.mkdir(exist_ok=True)
    write_jsonl(directory / "arc_easy.jsonl", [
        {"query": f"Question: {words(rng, 6)}?", "choices": [words(rng, n) for n in (1, 3, 2, 5)], "gold": g}
        for g in (0, 1, 2, 3, 1)])
    write_jsonl(directory / "winogrande.jsonl", [
        {"context_options": [words(rng, 5), words(rng, 5)], "continuation": words(rng, 3), "gold": g}
        for g in (0, 1, 1)])
    write_jsonl(directory / "lambada_openai.jsonl", [
        {"context": words(rng, 12), "continuation": words(rng, 1)} for _ in range(4)])
    rows = [words(rng, 30) for _ in range(4)]
    (directory / "wikitext2_test.raw").write_bytes("".join(f" {r} \r\n" for r in rows).encode())
    return directory


def test_task_metrics_follow_lm_eval_from_transformers_loglikelihoods(tiny, tmp_path):
    reference, model, tokenizer, _ = tiny
    data = make_data_dir(tmp_path / "eval", np.random.default_rng(2))
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731

    def expected_lls(item):
        return np.array([torch_score(reference, encode(c), encode(t), 64)[0] for c, t in item.options])

    arc = ev.load_task("arc_easy", data)
    assert arc.items[0].options[0][0].endswith("?\nAnswer:") and arc.items[0].options[0][1].startswith(" ")
    with jax.default_matmul_precision("highest"):
        got = ev.run_task(model.params, model.config, tokenizer, arc, max_length=64, batch_size=4).metrics
    lls = [expected_lls(item) for item in arc.items]
    acc = [np.argmax(ll) == item.gold for ll, item in zip(lls, arc.items)]
    acc_norm = [np.argmax(ll / np.array(item.norm_lengths)) == item.gold for ll, item in zip(lls, arc.items)]
    assert list(got) == ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"]
    assert (got["acc"], got["acc_norm"], got["n"]) == (np.mean(acc), np.mean(acc_norm), 5)
    assert got["acc_stderr"] == pytest.approx(lm_eval_stderr(acc), rel=1e-12)
    assert got["acc_norm_stderr"] == pytest.approx(lm_eval_stderr(acc_norm), rel=1e-12)
    assert arc.items[0].norm_lengths == tuple(len(c) for c in json.loads(
        (data / "arc_easy.jsonl").read_text().splitlines()[0])["choices"])  # characters, no leading space

    wino = ev.load_task("winogrande", data)
    with jax.default_matmul_precision("highest"):
        got = ev.run_task(model.params, model.config, tokenizer, wino, max_length=64, batch_size=4).metrics
    acc = [np.argmax(expected_lls(item)) == item.gold for item in wino.items]
    # The same continuation after every context: dividing by its length changes no argmax.
    assert got == {"acc": np.mean(acc), "acc_stderr": pytest.approx(lm_eval_stderr(acc), rel=1e-12),
                   "acc_norm": np.mean(acc), "acc_norm_stderr": pytest.approx(lm_eval_stderr(acc), rel=1e-12), "n": 3}

    lam = ev.load_task("lambada_openai", data, limit=3)
    with jax.default_matmul_precision("highest"):
        got = ev.run_task(model.params, model.config, tokenizer, lam, max_length=64, batch_size=2).metrics
    scored = [torch_score(reference, encode(c), encode(t), 64) for c, t in lam.items]
    assert got["n"] == 3 and got["acc"] == np.mean([g for _, g, _ in scored])
    assert got["acc_stderr"] == pytest.approx(lm_eval_stderr([g for _, g, _ in scored]), rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([lp for lp, _, _ in scored])), rel=PER_TOKEN_ATOL)

    wiki = ev.load_task("wikitext2", data)
    assert wiki.text.startswith(" ") and wiki.text.count("\n\n") == 3 and "\r" not in wiki.text


def test_empty_context_is_the_eos_token(tiny):
    _, model, tokenizer, _ = tiny
    (ctx, cont), = ev.tokenize_pairs(tokenizer, [("", " city river")])
    assert ctx == [tokenizer.eos_token_id] and len(cont) == 2


def test_bucketing_compiles_few_shapes():
    assert sorted({ev.bucket_length(n, 1024) for n in range(1, 1025)}) == [
        32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert {ev.bucket_length(n, 100) for n in range(1, 101)} == {32, 48, 64, 96, 100}
    assert all(n <= ev.bucket_length(n, 1024) < 1.5 * n for n in range(33, 1025))


def test_cli_compares_models_writes_json_table_and_chart(tiny, tmp_path, capsys):
    _, _, _, first = tiny
    second = tmp_path / "second"
    make_model(second, "llama", seed=1, num_hidden_layers=2)
    rng = np.random.default_rng(3)
    data = make_data_dir(tmp_path / "eval", rng)
    text = tmp_path / "notes.txt"
    text.write_text(words(rng, 80))
    mc = write_jsonl(tmp_path / "quiz.jsonl", [
        {"query": words(rng, 4), "choices": [words(rng, 1), words(rng, 2)], "gold": 1},
        {"context_options": [words(rng, 3), words(rng, 3)], "continuation": words(rng, 2), "gold": 0}])
    out = tmp_path / "report" / "eval.json"
    tasks = f"wikitext2,arc_easy,lambada_openai,winogrande,ppl:{text},mc:{mc}"
    code = cli.main(["evaluate", "--model", str(first), "--model", str(second), "--tasks", tasks,
                     "--data-dir", str(data), "--limit", "3", "--max-length", "32", "--batch-size", "2",
                     "--output", str(out), "-q"])
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["models"]) == [first.name, "second"]
    entry = report["models"]["second"]
    assert entry["path"] == str(second) and entry["num_hidden_layers"] == 2
    assert list(entry["results"]) == tasks.split(",")
    assert entry["results"]["wikitext2"]["n"] == 3 and entry["results"]["arc_easy"]["n"] == 3
    assert set(entry["results"]["arc_easy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert set(entry["results"]["lambada_openai"]) == {"acc", "acc_stderr", "perplexity", "n"}
    assert set(entry["results"]["winogrande"]) == set(entry["results"]["arc_easy"])  # every MC task has both
    assert entry["results"][f"mc:{mc}"]["n"] == 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| wikitext2 (n=3) | perplexity |" in table and "%)" in table
    arc = {name: report["models"][name]["results"]["arc_easy"] for name in report["models"]}
    first_cell = f"{arc[first.name]['acc_norm']:.4f} ± {arc[first.name]['acc_norm_stderr']:.4f}"
    assert f"| arc_easy (n=3) | acc_norm | {first_cell} | {arc['second']['acc_norm']:.4f} ± " in table
    assert "acc_stderr" not in table  # standard errors sit beside their metric, not on rows of their own
    # every item's outcome is kept, the accuracy is their mean, and the second model is paired with the first
    for name in report["models"]:
        for task in ("arc_easy", "lambada_openai", "winogrande", f"mc:{mc}"):
            outcomes = report["models"][name]["outcomes"][task]
            for metric, values in outcomes.items():
                assert len(values) == report["models"][name]["results"][task]["n"]
                assert np.mean(values) == pytest.approx(report["models"][name]["results"][task][metric])
    assert "paired" not in report["models"][first.name]
    paired = entry["paired"]["arc_easy"]["acc_norm"]
    assert paired["difference"] == pytest.approx(arc["second"]["acc_norm"] - arc[first.name]["acc_norm"])
    assert "wikitext2" not in entry["paired"]  # a perplexity has no per-item outcome to pair
    assert f"paired against {first.name}" in table and "| arc_easy (n=3) | acc_norm | " in table.split("paired")[1]


@pytest.mark.parametrize("outcomes", [[1, 0], [1, 1, 1, 0], [0, 0, 0], [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1]])
def test_accuracy_stderr_is_lm_evals_mean_stderr(outcomes):
    got = ev.accuracy("acc", [bool(o) for o in outcomes])
    p, n = np.mean(outcomes), len(outcomes)
    assert got["acc"] == p and got["acc_stderr"] == pytest.approx(lm_eval_stderr(outcomes), rel=1e-12, abs=1e-15)
    assert got["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12, abs=1e-15)


def test_paired_difference_is_the_mean_per_item_difference_with_its_stderr():
    first = [1, 1, 0, 0, 1, 0, 1, 1]
    second = [1, 0, 0, 1, 1, 0, 0, 1]
    diff = np.subtract(second, first)
    paired = ev.paired_difference(first, second)
    assert paired["difference"] == pytest.approx(np.mean(second) - np.mean(first))
    assert paired["stderr"] == pytest.approx(statistics.stdev(diff.tolist()) / math.sqrt(len(diff)))
    # the same outcomes: no difference and no spread, however noisy each accuracy is on its own
    assert ev.paired_difference(first, first) == {"difference": 0.0, "stderr": 0.0}
    assert ev.paired_difference([1], [0])["stderr"] is None
    with pytest.raises(ReplaceMeError, match="the same items"):
        ev.paired_difference(first, second[:-1])


def test_a_single_item_has_no_stderr():
    assert ev.accuracy("acc", [True]) == {"acc": 1.0, "acc_stderr": None}


@pytest.mark.parametrize("rows, message", [
    (['{"query": "q", "choices": ["a", "b"], "gold": 0}', '{"query": "q", '], ":2: invalid JSON"),
    (['{"query": "q", "choices": ["a", "b"], "gold": 2}'], ":1: gold 2 is out of range"),
    (['', '{"choices": ["a", "b"], "gold": 0}'], ":2: missing field 'query'"),
    (['{"query": "q", "choices": "a b", "gold": 0}'], ":1: field 'choices' must be list"),
    (['{"query": "q", "choices": ["a", "b"], "gold": true}'], ":1: field 'gold' must be int"),
    (['[1, 2]'], ":1: expected a JSON object"),
    ([], ": no items"),
])
def test_malformed_rows_name_the_file_and_line(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ReplaceMeError, match=str(path).replace("\\", "\\\\") + message):
        ev.load_task(f"mc:{path}")


def test_bad_task_names_and_missing_files_are_clear_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown task 'arc_medium'.*arc_easy.*ppl:FILE"):
        ev.load_task("arc_medium", tmp_path)
    with pytest.raises(ReplaceMeError, match=f"{tmp_path / 'piqa.jsonl'}: no such file"):
        ev.load_task("piqa", tmp_path)
    with pytest.raises(ReplaceMeError, match="nope.txt: no such file"):
        ev.load_task(f"ppl:{tmp_path / 'nope.txt'}")
    with pytest.raises(UsageError, match="--limit"):
        ev.load_task("piqa", tmp_path, limit=0)
    # The CLI checks tasks before loading any model, and exits 2 on a usage error.
    assert cli.main(["evaluate", "--model", str(tmp_path / "no-model"), "--tasks", "arc_medium"]) == 2
    assert "unknown task 'arc_medium'" in capsys.readouterr().err


def test_shipped_task_files_parse(tmp_path):
    data = ev.default_data_dir()
    if data is None:
        pytest.skip("shared/data/eval is not present")
    for name in ev.TASKS:
        task = ev.load_task(name, data, limit=50)
        expected = 30 if name == "gen_exact" else 50  # the bundled set has 30 items
        assert task.text if task.kind == "perplexity" else len(task.items) == expected
    hellaswag = ev.load_task("hellaswag", data, limit=1).items[0]
    assert hellaswag.options[0][1].startswith(" ") and not hellaswag.options[0][1].startswith("  ")


def test_table_gives_no_percentage_for_kl_even_when_the_first_models_kl_is_rounding():
    from replaceme_jax.evaluation import markdown_table

    results = {"a": {"wikitext2": {"n": 3, "perplexity": 10.0, "kl": 4.7e-10, "top1_agreement": 1.0}},
               "b": {"wikitext2": {"n": 3, "perplexity": 20.0, "kl": 1.2, "top1_agreement": 0.4}}}
    table = markdown_table({"models": {k: {"results": v} for k, v in results.items()}})
    kl_row = next(line for line in table.splitlines() if "| kl |" in line)
    assert kl_row.rstrip().endswith("| 1.2000 |")
    assert "(200.0%)" in table and "(40.0%)" in table


def test_gemma_gets_a_bos_before_every_scored_sequence_as_lm_eval_gives_it(tmp_path):
    """``bos: auto``: Gemma (trained with a BOS) is scored after one, as lm-evaluation-harness does;
    other families as before. Perplexity windows are then ``max_length - 1`` tokens scored whole."""
    from tests.helpers import FAMILY_CONFIGS

    model_type, overrides = FAMILY_CONFIGS["gemma3_text"]
    torch_gemma = make_model(tmp_path / "gemma", model_type, **overrides)
    make_model(tmp_path / "llama", "llama", num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(4)
    text = tmp_path / "notes.txt"
    text.write_text(words(rng, 100))
    data = make_data_dir(tmp_path / "eval", rng)
    tasks = f"ppl:{text},arc_easy,lambada_openai"
    with jax.default_matmul_precision("highest"):
        report = ev.run_evaluation([str(tmp_path / "gemma"), str(tmp_path / "llama")], tasks, data_dir=data,
                                   max_length=16, batch_size=3, progress=False)
        never = ev.run_evaluation([str(tmp_path / "gemma")], tasks, data_dir=data, max_length=16, batch_size=3,
                                  progress=False, bos=False)
    gemma, llama = report["models"].values()
    assert report["settings"]["bos"] == "auto" and gemma["bos"] and not llama["bos"]
    assert not next(iter(never["models"].values()))["bos"]

    model = load_model(tmp_path / "gemma")
    tokenizer = load_tokenizer(model)
    bos = tokenizer.bos_token_id
    tokens = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    windows = [tokens[i * 15:(i + 1) * 15] for i in range(len(tokens) // 15)]
    logprobs = [torch_score(torch_gemma, [bos], w, 16)[0] for w in windows]
    assert gemma["results"][f"ppl:{text}"]["perplexity"] == pytest.approx(
        math.exp(-sum(logprobs) / (15 * len(windows))), rel=PER_TOKEN_ATOL)

    task = ev.load_task("lambada_openai", data)
    pairs = ev.tokenize_pairs(tokenizer, task.items)
    with_bos = ev.score_requests(model.params, model.config, [([bos, *c], t) for c, t in pairs], max_length=16)
    assert gemma["results"]["lambada_openai"]["perplexity"] == pytest.approx(
        math.exp(-with_bos.logprob.mean()), rel=1e-5)
    assert gemma["results"]["lambada_openai"]["perplexity"] != pytest.approx(
        next(iter(never["models"].values()))["results"]["lambada_openai"]["perplexity"], rel=1e-3)
