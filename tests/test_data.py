"""Calibration data: loading local files, SlimOrca chat rows, tokenizing, and length-bucketed batches."""

import csv
import json
import logging

import numpy as np
import pytest

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax import data
from replaceme_jax.data import (
    bucket_length,
    load_calibration,
    load_texts,
    make_batches,
    slimorca_dialog,
    tokenize_texts,
)
from replaceme_jax.errors import ReplaceMeError, UsageError
from tests.helpers import make_model, make_tokenizer

ROWS = ["the city and the river", "a small garden", "music of the night", "old stone house"]


def write(path, rows, column="text"):
    """``rows`` as a file of the type its suffix names, with ``column`` plus a second column."""
    records = [{column: r, "id": i} for i, r in enumerate(rows)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[column, "id"])
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".txt":
        path.write_text("".join(r + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_load_texts_reads_each_local_format(tmp_path, suffix):
    path = write(tmp_path / f"calib{suffix}", ROWS)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert load_texts(str(path)) == ROWS
    assert load_texts(str(path), size=2) == ROWS[:2]
    # Nothing (no arrow cache, no lock files) is written next to the data.
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_blank_texts_are_skipped_and_size_counts_texts(tmp_path):
    path = tmp_path / "paragraphs.txt"
    path.write_text("\nfirst paragraph\n\n   \nsecond paragraph\n\nthird\n")
    assert load_texts(str(path)) == ["first paragraph", "second paragraph", "third"]
    assert load_texts(str(path), size=2) == ["first paragraph", "second paragraph"]


def test_other_column_and_missing_column_error(tmp_path):
    path = write(tmp_path / "calib.jsonl", ROWS, column="content")
    assert load_texts(str(path), column="content") == ROWS
    with pytest.raises(ReplaceMeError, match=r"calib\.jsonl: no column 'text' \(available: content, id\)"):
        load_texts(str(path))


@pytest.mark.parametrize("name, content, message", [
    ("calib.jsonl", "", r"calib\.jsonl: the file is empty"),
    ("calib.csv", "text,id\n", r"calib\.csv: the data set is empty"),
    ("calib.txt", "\n\n  \n", r"calib\.txt: no non-empty texts in column 'text'"),
])
def test_empty_data_sets_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ReplaceMeError, match=message):
        load_texts(str(path))


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(ReplaceMeError, match=r"missing\.jsonl: no such file"):
        load_texts(str(tmp_path / "missing.jsonl"))
    odd = tmp_path / "calib.xml"
    odd.write_text("<a/>")
    with pytest.raises(ReplaceMeError, match=r"calib\.xml: unsupported file type '\.xml'"):
        load_texts(str(odd))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ReplaceMeError, match=r"broken\.jsonl: cannot read as a data set"):
        load_texts(str(broken))


def test_the_package_reexports_the_public_names_of_its_modules():
    """``from replaceme_jax.data import X`` keeps working for every public function and class of the
    modules the package is split into, and names the very object the module defines."""
    import inspect

    modules = (data.sources, data.tokenizing, data.batching, data.self_generated, data.calibration)
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            if value.__module__ == module.__name__:
                assert name in data.__all__ and getattr(data, name) is value, f"{module.__name__}.{name}"
    assert all(hasattr(data, name) for name in data.__all__)
    # Private helpers are patched where they are called: the package does not carry a stale copy.
    assert not hasattr(data, "_hub_reachable")


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data.sources, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ReplaceMeError, match=r"dataset 'Open-Orca/SlimOrca': the Hugging Face Hub is unreachable") as e:
        load_texts("Open-Orca/SlimOrca", chat_format="slimorca")
    assert "\n" not in str(e.value)


CONVERSATIONS = [
    [{"from": "system", "value": "be brief"}, {"from": "human", "value": "the city"},
     {"from": "gpt", "value": "a river"}, {"from": "human", "value": "more"}, {"from": "gpt", "value": "no"}],
    [{"from": "human", "value": "music"}, {"from": "gpt", "value": "of the night"}],
    [{"from": "system", "value": "x"}, {"from": "human", "value": "unanswered"}],  # no reply: skipped
]


def test_slimorca_takes_the_first_human_turn_and_its_reply():
    assert slimorca_dialog(CONVERSATIONS[0]) == [{"role": "user", "content": "the city"},
                                                 {"role": "assistant", "content": "a river"}]
    assert slimorca_dialog(CONVERSATIONS[2]) is None


def test_slimorca_rows_use_the_chat_template(tmp_path, tokenizer):
    path = tmp_path / "orca.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in CONVERSATIONS))
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    try:
        texts = load_texts(str(path), chat_format="slimorca", tokenizer=tokenizer)
        # Reference configs name the formatted column `text`; it falls back to `conversations`.
        assert load_texts(str(path), column="text", chat_format="slimorca", tokenizer=tokenizer) == texts
    finally:
        tokenizer.chat_template = None
    assert texts == ["<s>user: the city</s><s>assistant: a river</s>",
                     "<s>user: music</s><s>assistant: of the night</s>"]


def test_slimorca_without_a_chat_template_joins_turns_and_warns(tmp_path, tokenizer, caplog):
    path = tmp_path / "orca.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in CONVERSATIONS))
    with caplog.at_level(logging.WARNING, logger="replaceme_jax.data"):
        texts = load_texts(str(path), chat_format="slimorca", tokenizer=tokenizer, size=1)
    assert texts == ["user\nthe city\nassistant\na river"]
    assert "no chat template" in caplog.text
    with pytest.raises(ReplaceMeError, match="no column 'text'.*set chat_format: slimorca"):
        load_texts(str(path))


def test_tokenize_texts_truncates_and_handles_bos(tokenizer):
    bos = tokenizer.bos_token_id
    plain = tokenize_texts(tokenizer, ["the city and the river", "a"], max_length=3)
    assert [s.tolist() for s in plain] == [tokenizer("the city and")["input_ids"], tokenizer("a")["input_ids"]]
    assert all(s.dtype == np.int32 for s in plain)
    with_bos = tokenize_texts(tokenizer, ["the city and", "<s> a garden"], max_length=3, add_bos=True)
    # Exactly one BOS, also where the text (e.g. a chat template) already starts with it.
    assert [s.tolist() for s in with_bos] == [[bos] + tokenizer("the city")["input_ids"],
                                              [bos] + tokenizer("a garden")["input_ids"]]
    assert [len(s) for s in tokenize_texts(tokenizer, ["the city", ""], max_length=8)] == [2]
    with pytest.raises(ReplaceMeError, match="no tokens left"):
        tokenize_texts(tokenizer, ["", ""], max_length=8)


def test_bucket_lengths():
    assert [bucket_length(n, 1024) for n in (1, 16, 17, 100, 128, 129, 1000, 1024)] == \
        [16, 16, 32, 128, 128, 256, 1024, 1024]
    assert bucket_length(700, 600) == 600  # never past max_length, even if it is no power of two
    assert [bucket_length(n, 512, 64) for n in (1, 64, 65, 500)] == [64, 64, 128, 512]
    assert bucket_length(37, 512, "longest") == 37


def random_sequences(n, seed=0, low=1, high=600):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 100, rng.integers(low, high)).astype(np.int32) for _ in range(n)]


def test_batches_have_few_shapes_keep_every_token_and_are_right_padded():
    seqs = random_sequences(1000)
    batches = make_batches(seqs, batch_size=8, max_length=512, pad_id=0)
    assert len(batches) == 125 and batches.num_sequences == 1000
    assert len(batches.shapes) <= 6 and all(b == 8 for b, _ in batches.shapes)
    assert batches.num_tokens == sum(min(len(s), 512) for s in seqs)
    seen = []
    for batch in batches:
        lengths = batch.attention_mask.sum(axis=1)
        for r in range(batch.input_ids.shape[0]):
            n = lengths[r]
            assert batch.attention_mask[r, :n].all() and not batch.attention_mask[r, n:].any()  # right padding
            assert (batch.input_ids[r, n:] == 0).all()
            if r < batch.n_real_rows:
                np.testing.assert_array_equal(batch.input_ids[r, :n], seqs[batch.rows[r]][:512])
            else:
                assert n == 0
        seen.extend(batch.rows)
    assert sorted(seen) == list(range(1000))
    assert batches.padding_fraction < 0.35  # sorted rows, pow2 buckets


def test_last_batch_is_filled_with_empty_rows_and_batching_is_deterministic():
    seqs = random_sequences(10, seed=1, high=40)
    first = make_batches(seqs, batch_size=4, max_length=64, pad_id=2, sort_by_length=False)
    again = make_batches(seqs, batch_size=4, max_length=64, pad_id=2, sort_by_length=False)
    assert [b.rows for b in first] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]  # input order kept
    last = first.batches[-1]
    assert last.n_real_rows == 2 and last.input_ids.shape[0] == 4
    assert not last.attention_mask[2:].any() and (last.input_ids[2:] == 2).all()
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert [b.rows for b in make_batches(seqs, 4, 64, 0, drop_last=True)] == \
        [b.rows for b in make_batches(seqs, 4, 64, 0)][:2]


def test_load_calibration_reads_a_file_or_samples_the_model(tmp_path):
    make_model(tmp_path / "model", "llama")
    model = load_model(tmp_path / "model")
    tok = load_tokenizer(model)
    path = write(tmp_path / "calib.jsonl", ROWS)
    seqs = load_calibration(str(path), tok, max_length=3)
    assert [s.tolist() for s in seqs] == [tok(r)["input_ids"][:3] for r in ROWS]

    own = load_calibration("self", tok, max_length=10, size=3, params=model.params, config=model.config, seed=1)
    assert len(own) == 3 and all(1 < len(s) <= 10 and s[0] == tok.bos_token_id for s in own)
    with pytest.raises(ReplaceMeError, match="needs the model"):
        load_calibration("self", tok, max_length=10)


def test_mixture_counts_split_by_ratio_and_give_every_source_a_row():
    assert data.mixture_counts([3, 1], 8) == [6, 2]
    assert data.mixture_counts([0.5, 0.25, 0.25], 10) == [5, 3, 2]  # largest remainder, ties to the first
    assert data.mixture_counts([1000, 1], 4) == [3, 1]
    for ratios, total in (([1, 2, 3], 7), ([0.1, 5], 100), ([1] * 5, 5)):
        counts = data.mixture_counts(ratios, total)
        assert sum(counts) == total and min(counts) >= 1
    with pytest.raises(UsageError, match="smaller than the number of mixture sources"):
        data.mixture_counts([1, 1, 1], 2)


@pytest.mark.parametrize("spec,message", [
    ([], "non-empty list"),
    ("c4.jsonl", "non-empty list"),
    (["c4.jsonl"], r"'dataset\[0\]' must be a mapping"),
    ([{"dataset": "a.jsonl", "ratio": 1}, {"dataset": "b.jsonl", "ratio": 0}], r"'dataset\[1\]': 'ratio' must be a pos"),
    ([{"dataset": "a.jsonl", "ratio": "half"}], "'ratio' must be a positive number"),
    ([{"dataset": "a.jsonl", "weight": 2}], "unknown key.s. weight"),
    ([{"ratio": 1}], "'dataset' must be a non-empty string"),
    ([{"dataset": "a.jsonl", "chat_format": "alpaca"}], "chat_format must be one of"),
])
def test_bad_mixtures_name_the_entry(spec, message):
    with pytest.raises(UsageError, match=message):
        data.parse_mixture(spec)


def test_a_mixture_takes_rows_by_ratio_from_each_source_and_shuffles_them(tmp_path):
    make_model(tmp_path / "model", "llama")
    model = load_model(tmp_path / "model")
    tok = load_tokenizer(model)
    a_rows = [f"{n} {w}" for n in ("north", "south", "east") for w in ROWS]
    a = write(tmp_path / "a.jsonl", a_rows)
    b = write(tmp_path / "b.csv", [f"west {w}" for w in ROWS], column="body")
    spec = [{"dataset": str(a), "ratio": 3}, {"dataset": str(b), "ratio": 1, "dataset_column": "body"}]
    summary = []
    seqs = load_calibration(spec, tok, max_length=16, size=8, seed=0, summary=summary)
    texts = [tok.decode(s, skip_special_tokens=True) for s in seqs]
    from_b = [t for t in texts if t.startswith("west")]
    assert len(from_b) == 2 and sorted(t for t in texts if not t.startswith("west")) == sorted(a_rows[:6])
    assert texts[:6] != a_rows[:6]  # interleaved, not source after source
    assert [(s["dataset"], s["sequences"]) for s in summary] == [(str(a), 6), (str(b), 2)]
    assert sum(s["tokens"] for s in summary) == sum(map(len, seqs))
    again = load_calibration(spec, tok, max_length=16, size=8, seed=0)
    assert [s.tolist() for s in again] == [s.tolist() for s in seqs]
    # a source may be the model itself
    mixed = load_calibration([{"dataset": str(a), "ratio": 1}, {"dataset": "self", "ratio": 1}], tok, max_length=6,
                             size=4, params=model.params, config=model.config, summary=(summary := []))
    assert len(mixed) == 4 and [s["sequences"] for s in summary] == [2, 2]


def test_every_shipped_config_parses():
    from pathlib import Path

    from replaceme_jax.config import CompressConfig, load_config
    from replaceme_jax.experts.config import ExpertsConfig

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for path in files:
        config = load_config(ExpertsConfig if path.name.startswith("moe_") else CompressConfig, str(path))
        assert config.dataset and config.save_path, path
