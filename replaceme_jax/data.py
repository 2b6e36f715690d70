"""Calibration data: texts from a data set (or from the model itself), token ids, and fixed-shape batches.

The pipeline is ``load_calibration`` (texts -> token ids, or self-generated ids for ``dataset: self``)
followed by ``make_batches``. Batches are right-padded and their lengths rounded up to a few bucket
lengths, so a run over a thousand documents compiles a handful of shapes rather than one per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.tokens import pad_token_id

log = logging.getLogger(__name__)

# Local files by extension -> `datasets` builder.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
CHAT_FORMATS = ("slimorca",)
SELF_DATASET = "self"
BUCKETS = ("pow2", "longest")  # or an int: round lengths up to a multiple of it
MIN_BUCKET = 16

_ROW_CHUNK = 1024  # rows read from a dataset at a time, so `size` rows of a huge set stay cheap


# ---------------------------------------------------------------------------------------------
# Loading texts


def _is_local(dataset: str) -> bool:
    path = Path(dataset).expanduser()
    return (path.exists() or path.suffix.lower() in LOCAL_BUILDERS
            or dataset.startswith(("/", "./", "../", "~")))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe; without it an offline `load_dataset` spends ~25 s in retries before failing."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let `datasets` try
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_mode() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _root_message(e: BaseException) -> str:
    """The first line of the innermost cause: `datasets` wraps the parser's error in a generic one."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_progress():
    """No "Generating train split" bars for a local file that loads in milliseconds."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _open_local(path: Path, subset: str | None, split: str | None):
    import datasets

    if not path.exists():
        raise ReplaceMeError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise ReplaceMeError(f"{path}: the file is empty")
    # A temporary cache plus keep_in_memory: nothing is written next to the user's data or into ~/.cache.
    with tempfile.TemporaryDirectory(prefix="replaceme_jax_data_") as cache, _quiet_progress():
        try:
            if path.is_dir():
                loaded = datasets.load_dataset(str(path), name=subset, cache_dir=cache, keep_in_memory=True)
            else:
                builder = LOCAL_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise ReplaceMeError(
                        f"{path}: unsupported file type {path.suffix!r} (use {', '.join(sorted(LOCAL_BUILDERS))})"
                    )
                loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache, keep_in_memory=True)
        except ReplaceMeError:
            raise
        except Exception as e:  # pyarrow/json parse errors come in many types; name the file, keep one line
            if "corresponds to no data" in str(e):
                raise ReplaceMeError(f"{path}: the data set is empty") from None
            raise ReplaceMeError(f"{path}: cannot read as a data set ({_root_message(e)})") from None
    names = list(loaded)
    if split is not None and split in loaded:
        return loaded[split]
    if len(names) == 1:
        if split not in (None, names[0]):
            log.warning("%s has a single split %r; ignoring split=%r", path, names[0], split)
        return loaded[names[0]]
    if split is None and "train" in loaded:
        return loaded["train"]
    raise ReplaceMeError(f"{path}: no split {split!r} (available: {', '.join(names)})")


def _open_hub(name: str, subset: str | None, split: str | None):
    import datasets

    if not _offline_mode() and not _hub_reachable():
        raise ReplaceMeError(
            f"dataset {name!r}: the Hugging Face Hub is unreachable (offline?); pass a local file "
            f"(.jsonl/.json/.parquet/.csv/.txt), use 'self', or set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    try:
        return datasets.load_dataset(name, name=subset, split=split or "train")
    except ConnectionError:
        raise ReplaceMeError(f"dataset {name!r}: cannot reach the Hugging Face Hub and no cached copy") from None
    except Exception as e:
        raise ReplaceMeError(f"dataset {name!r}: {_root_message(e)}") from None


def _iter_column(ds, column: str) -> Iterator[Any]:
    for start in range(0, len(ds), _ROW_CHUNK):
        yield from ds[start : start + _ROW_CHUNK][column]


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def slimorca_dialog(conversations: Sequence[dict]) -> list[dict] | None:
    """The reference's SlimOrca rule: the first human turn and the first gpt reply after it.

    Returns chat messages ``[{"role": "user", ...}, {"role": "assistant", ...}]``, or None when the row
    has no such pair.
    """
    turns = list(conversations or [])
    for i, turn in enumerate(turns):
        if turn.get("from") == "human":
            reply = next((t for t in turns[i + 1 :] if t.get("from") == "gpt"), None)
            if reply is None:
                return None
            return [{"role": "user", "content": turn.get("value") or ""},
                    {"role": "assistant", "content": reply.get("value") or ""}]
    return None


def format_dialog(tokenizer, messages: list[dict]) -> str:
    """Render chat messages with the tokenizer's chat template, or plain ``role\\ncontent`` lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}\n{m['content']}" for m in messages)


def _resolve_column(ds, column: str | None, chat_format: str | None, where: str) -> str:
    available = list(ds.column_names)
    default = "conversations" if chat_format == "slimorca" else "text"
    if column is None:
        column = default
    elif chat_format == "slimorca" and column == "text" and "text" not in available and "conversations" in available:
        # Reference configs say `dataset_column: text` for SlimOrca (the column after its formatting).
        column = "conversations"
    if column not in available:
        hint = ""
        if chat_format is None and "conversations" in available:
            hint = "; for chat rows set chat_format: slimorca"
        raise ReplaceMeError(f"{where}: no column {column!r} (available: {', '.join(available)}){hint}")
    return column


def load_texts(
    dataset: str,
    column: str | None = None,
    subset: str | None = None,
    split: str | None = None,
    size: int | None = None,
    chat_format: str | None = None,
    tokenizer=None,
) -> list[str]:
    """The first ``size`` non-blank texts of a data set.

    ``dataset`` is a local file (``.jsonl``/``.json``/``.parquet``/``.csv``/``.txt``, one row a line for
    text), a local dataset directory, or a Hugging Face Hub name (needs network, or ``HF_HUB_OFFLINE=1``
    with a cached copy). ``subset`` is the Hub configuration name, ``split`` the split (default
    ``train``; a local file has one split, which is used). ``column`` defaults to ``text``, or to
    ``conversations`` with ``chat_format="slimorca"``, where each row's first human turn and the gpt
    reply are rendered with the tokenizer's chat template. Blank texts are skipped: they carry no tokens.
    """
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise ReplaceMeError(f"unknown chat_format {chat_format!r} (choose from {', '.join(CHAT_FORMATS)})")
    if size is not None and size <= 0:
        raise ReplaceMeError(f"dataset size must be positive, got {size}")
    if _is_local(dataset):
        path = Path(dataset).expanduser()
        ds = _open_local(path, subset, split)
        where = str(path)
    else:
        ds = _open_hub(dataset, subset, split)
        where = f"dataset {dataset!r}"
    if len(ds) == 0:
        raise ReplaceMeError(f"{where}: the data set is empty")
    column = _resolve_column(ds, column, chat_format, where)

    if chat_format == "slimorca" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        log.warning("%s: the tokenizer has no chat template; joining turns as 'user\\n...\\nassistant\\n...'", where)
    texts: list[str] = []
    for row, value in enumerate(_iter_column(ds, column)):
        if size is not None and len(texts) >= size:
            break
        if chat_format == "slimorca":
            if not isinstance(value, list):
                raise ReplaceMeError(f"{where}: row {row}: column {column!r} is not a list of conversation turns")
            messages = slimorca_dialog(value)
            if messages is None:
                continue
            value = format_dialog(tokenizer, messages)
        elif value is None:
            continue
        elif not isinstance(value, str):
            raise ReplaceMeError(
                f"{where}: column {column!r} holds {type(value).__name__}, not text"
                + ("; for chat rows set chat_format: slimorca" if isinstance(value, list) else "")
            )
        if not _is_blank(value):
            texts.append(value)
    if not texts:
        raise ReplaceMeError(f"{where}: no non-empty texts in column {column!r}")
    if size is not None and len(texts) < size:
        log.warning("%s: asked for %d texts, found %d", where, size, len(texts))
    return texts


# ---------------------------------------------------------------------------------------------
# Tokenizing


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int, add_bos: bool | None = None) -> list[np.ndarray]:
    """Token ids of each text as int32 arrays, truncated to ``max_length``; empty results are dropped.

    ``add_bos``: None keeps the tokenizer's own special tokens (what the reference does: Llama 3 adds
    BOS, SmolLM2 and Qwen add nothing); True makes every sequence start with exactly one BOS (also when
    a chat template already wrote one); False adds no special tokens.
    """
    if max_length <= 0:
        raise ReplaceMeError(f"max_length must be positive, got {max_length}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ReplaceMeError("add_bos is set but the tokenizer has no BOS token")
    encoded = tokenizer(list(texts), add_special_tokens=add_bos is None, truncation=True,
                        max_length=max_length)["input_ids"]
    out = []
    for ids in encoded:
        if add_bos and (not ids or ids[0] != bos):
            ids = [bos] + list(ids)
        if ids:
            out.append(np.asarray(ids[:max_length], dtype=np.int32))
    if not out:
        raise ReplaceMeError("no tokens left after tokenization (all texts empty)")
    return out


# ---------------------------------------------------------------------------------------------
# Batching


@dataclasses.dataclass(frozen=True)
class Batch:
    """One right-padded batch. Rows past ``n_real_rows`` are empty (mask all zeros) fillers."""

    input_ids: np.ndarray  # [B, S] int32
    attention_mask: np.ndarray  # [B, S] int32
    n_real_rows: int
    rows: tuple[int, ...]  # index in the input sequence list of each real row

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclasses.dataclass(frozen=True)
class Batches:
    """The batches of a calibration set plus its totals; iterate over it for the batches."""

    batches: tuple[Batch, ...]
    num_tokens: int  # real (non-pad) tokens
    num_sequences: int
    sources: tuple[dict, ...] = ()  # per data source: dataset, ratio, sequences, tokens

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Distinct batch shapes in order of first use (each is one compilation of a jitted step)."""
        return list(dict.fromkeys(b.input_ids.shape for b in self.batches))

    @property
    def padding_fraction(self) -> float:
        total = sum(b.input_ids.size for b in self.batches)
        return 1.0 - self.num_tokens / total if total else 0.0


def bucket_length(length: int, max_length: int, bucket: int | str = "pow2") -> int:
    """The padded length for a batch whose longest row has ``length`` tokens.

    ``"pow2"``: the next power of two (at least 16); an int: the next multiple of it; ``"longest"``:
    ``length`` itself (the reference's ``padding="longest"``; one shape per distinct length). Never
    more than ``max_length``.
    """
    if bucket == "longest":
        padded = length
    elif bucket == "pow2":
        padded = max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())
    elif isinstance(bucket, int) and not isinstance(bucket, bool) and bucket > 0:
        padded = -(-length // bucket) * bucket
    else:
        raise ReplaceMeError(f"unknown bucket {bucket!r} (use {' or '.join(map(repr, BUCKETS))} or a positive int)")
    return max(1, min(padded, max_length))


def make_batches(
    sequences: Sequence[np.ndarray],
    batch_size: int,
    max_length: int,
    pad_id: int,
    bucket: int | str = "pow2",
    sort_by_length: bool = True,
    drop_last: bool = False,
) -> Batches:
    """Group token sequences into right-padded ``[batch_size, L]`` batches, ``L`` from a few buckets.

    Sequences longer than ``max_length`` are truncated. With ``sort_by_length`` (the default) rows are
    ordered longest first, so each batch holds similar lengths (little padding) and the largest shape
    runs first (an out-of-memory shows at once); ties keep input order, so the result is deterministic.
    Every batch has ``batch_size`` rows: the last is completed with empty rows (mask all zeros) so the
    step function sees no new batch dimension. ``drop_last`` drops an incomplete last batch instead
    (the reference's DataLoader does).
    """
    if batch_size <= 0:
        raise ReplaceMeError(f"batch_size must be positive, got {batch_size}")
    seqs = [np.asarray(s, dtype=np.int32)[:max_length] for s in sequences]
    order = [i for i in range(len(seqs)) if len(seqs[i]) > 0]
    if not order:
        raise ReplaceMeError("no calibration sequences to batch (all empty)")
    if sort_by_length:
        order.sort(key=lambda i: -len(seqs[i]))  # list.sort is stable
    if drop_last:
        order = order[: len(order) - len(order) % batch_size]
        if not order:
            raise ReplaceMeError(f"fewer calibration sequences than batch_size={batch_size} with drop_last")

    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = bucket_length(max(len(seqs[i]) for i in rows), max_length, bucket)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
            n = len(seqs[i])
            ids[r, :n] = seqs[i]
            mask[r, :n] = 1
        batches.append(Batch(input_ids=ids, attention_mask=mask, n_real_rows=len(rows), rows=tuple(rows)))
    num_tokens = sum(len(seqs[i]) for i in order)
    return Batches(batches=tuple(batches), num_tokens=num_tokens, num_sequences=len(order))


# ---------------------------------------------------------------------------------------------
# Mixtures of several sources


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One entry of a calibration mixture; unset fields take the run's top-level values."""

    dataset: str
    ratio: float = 1.0
    dataset_column: str | None = None
    dataset_subset: str | None = None
    chat_format: str | None = None


_SOURCE_KEYS = {f.name for f in dataclasses.fields(DataSource)}


def parse_mixture(spec: Sequence[Mapping[str, Any]], key: str = "dataset") -> list[DataSource]:
    """Validate a mixture spec: a non-empty list of ``{dataset, ratio, [dataset_column, dataset_subset,
    chat_format]}`` mappings with positive ratios (relative weights; they need not sum to 1)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        raise UsageError(f"config key {key!r}: a mixture is a non-empty list of {{dataset, ratio}} entries")
    sources = []
    for i, entry in enumerate(spec):
        where = f"config key '{key}[{i}]'"
        if not isinstance(entry, Mapping):
            raise UsageError(f"{where} must be a mapping with keys dataset and ratio (got {entry!r})")
        unknown = sorted(set(entry) - _SOURCE_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_SOURCE_KEYS))})")
        name = entry.get("dataset")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{where}: 'dataset' must be a non-empty string (got {name!r})")
        ratio = entry.get("ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or not np.isfinite(ratio):
            raise UsageError(f"{where}: 'ratio' must be a positive number (got {ratio!r})")
        for field in ("dataset_column", "dataset_subset", "chat_format"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise UsageError(f"{where}: {field!r} must be a string (got {entry[field]!r})")
        if entry.get("chat_format") is not None and entry["chat_format"] not in CHAT_FORMATS:
            raise UsageError(f"{where}: chat_format must be one of {', '.join(CHAT_FORMATS)}")
        sources.append(DataSource(**{**entry, "ratio": float(ratio)}))
    return sources


def mixture_counts(ratios: Sequence[float], total: int) -> list[int]:
    """Split ``total`` sequences by ``ratios`` (largest remainder; every source gets at least one)."""
    if total < len(ratios):
        raise UsageError(f"dataset_size {total} is smaller than the number of mixture sources ({len(ratios)})")
    share = np.asarray(ratios, np.float64) / np.sum(ratios) * total
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero(counts == 0):  # a tiny ratio still contributes one row, taken from the largest
        counts[np.argmax(counts)] -= 1
        counts[i] = 1
    return counts.tolist()


# ---------------------------------------------------------------------------------------------
# Entry point for the pipeline


def load_calibration(
    dataset: str | Sequence[Mapping[str, Any]],
    tokenizer,
    max_length: int,
    *,
    size: int | None = None,
    column: str | None = None,
    subset: str | None = None,
    split: str | None = None,
    chat_format: str | None = None,
    add_bos: bool | None = None,
    params=None,
    config=None,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generation_batch_size: int = 16,
    prompts: Sequence[str] | None = None,
    summary: list | None = None,
) -> list[np.ndarray]:
    """Calibration token sequences (int32, at most ``max_length`` long); batch them with ``make_batches``.

    ``dataset="self"`` samples ``size`` (default 128) sequences of ``max_length`` tokens from the model
    itself (``params``/``config`` required; ``seed``, ``temperature``, ``top_k``, ``top_p``,
    ``prompts`` as in ``generate.sample_texts``), so compression needs no data at all. Anything else is
    read with ``load_texts`` and tokenized with ``tokenize_texts``.

    ``dataset`` may also be a mixture (see ``parse_mixture``): ``size`` sequences split over the
    sources by ratio, each source read as above (``self`` included), then shuffled together with
    ``seed`` so every batch mixes sources. ``summary`` (a list) receives one dict per source with the
    sequences and tokens it gave.
    """
    if not isinstance(dataset, str):
        sources = parse_mixture(dataset)
        counts = mixture_counts([s.ratio for s in sources], size or 128)
        sequences, parts = [], summary if summary is not None else []
        for source, count in zip(sources, counts):
            got = load_calibration(
                source.dataset, tokenizer, max_length, size=count,
                column=source.dataset_column if source.dataset_column is not None else column,
                split=source.dataset_subset if source.dataset_subset is not None else split,
                chat_format=source.chat_format if source.chat_format is not None else chat_format,
                add_bos=add_bos, params=params, config=config, seed=seed, temperature=temperature, top_k=top_k,
                top_p=top_p, generation_batch_size=generation_batch_size, prompts=prompts, summary=parts)
            parts[-1]["ratio"] = source.ratio
            log.info("calibration source %s: %d sequences, %d tokens (ratio %g)", source.dataset, len(got),
                     parts[-1]["tokens"], source.ratio)
            sequences.extend(got)
        order = np.random.default_rng(seed).permutation(len(sequences))
        return [sequences[i] for i in order]
    if dataset == SELF_DATASET:
        if params is None or config is None:
            raise ReplaceMeError("dataset 'self' needs the model (params and config) to sample from")
        from replaceme_jax.generate import sample_texts

        num = size or 128
        # The prompt (start token or seed prompt) counts towards max_length.
        samples = sample_texts(params, config, tokenizer, num_samples=num, max_new_tokens=max(1, max_length - 1),
                               batch_size=min(generation_batch_size, num), seed=seed, temperature=temperature,
                               top_k=top_k, top_p=top_p, prompts=prompts)
        sequences = [s[:max_length] for s in samples if len(s)]
    else:
        texts = load_texts(dataset, column=column, subset=subset, split=split, size=size, chat_format=chat_format,
                           tokenizer=tokenizer)
        sequences = tokenize_texts(tokenizer, texts, max_length, add_bos=add_bos)
    if summary is not None:
        summary.append({"dataset": dataset, "ratio": 1.0, "requested": size, "sequences": len(sequences),
                        "tokens": int(sum(map(len, sequences)))})
    return sequences


def check_sources(dataset: str | Sequence[Mapping[str, Any]]) -> None:
    """Fail at once on a local data file that does not exist (before any model is loaded)."""
    names = [dataset] if isinstance(dataset, str) else [entry.get("dataset") for entry in dataset]
    for name in names:
        if not isinstance(name, str) or name == SELF_DATASET or not _is_local(name):
            continue
        if not Path(name).expanduser().exists():
            raise ReplaceMeError(f"{name}: no such file (calibration dataset)")


def split_heldout(sequences: Sequence[np.ndarray], fraction: float, minimum: int, seed: int = 0
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out whole sequences (documents, never rows of one) to validate a fit: ``max(minimum,
    round(fraction * n))`` of them, drawn with ``seed``; the rest keep their order. ``fraction=0``
    holds out nothing."""
    sequences = list(sequences)
    if fraction <= 0:
        return sequences, []
    n = len(sequences)
    k = max(minimum, round(fraction * n))
    if n - k < k:
        raise ReplaceMeError(
            f"too little calibration data to validate the fit: {n} sequences, and {k} are held out "
            f"(need at least {2 * k}; raise dataset_size, or set validation_fraction: 0 with a numeric alpha "
            f"and first_token_rows include|exclude)")
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return ([s for i, s in enumerate(sequences) if i not in held], [s for i, s in enumerate(sequences) if i in held])


def calibration_sequences(cfg, tokenizer, params=None, config=None) -> tuple[list[np.ndarray], tuple[dict, ...]]:
    """Token sequences for a run config (``compress`` or ``experts``), and what each data source gave."""
    sources: list[dict] = []
    sequences = load_calibration(
        cfg.dataset, tokenizer, cfg.max_length, size=cfg.dataset_size, column=cfg.dataset_column,
        split=cfg.dataset_subset, chat_format=cfg.chat_format, params=params, config=config, seed=cfg.seed,
        temperature=cfg.self_temperature, top_k=cfg.self_top_k, top_p=cfg.self_top_p,
        generation_batch_size=cfg.self_batch_size, summary=sources)
    return sequences, tuple(sources)


def batches_for(cfg, sequences: Sequence[np.ndarray], tokenizer, sources: tuple[dict, ...] = ()) -> Batches:
    """``make_batches`` with a run config's batch size, length and bucketing."""
    batches = make_batches(sequences, cfg.batch_size, cfg.max_length, pad_token_id(tokenizer), bucket=cfg.bucket,
                           sort_by_length=getattr(cfg, "sort_by_length", True))
    return dataclasses.replace(batches, sources=sources)


def calibration_batches(cfg, tokenizer, params=None, config=None) -> Batches:
    """Batches for a run config (``compress`` or ``experts``): its data keys, ``self`` sampling keys,
    bucketing and seed. ``Batches.sources`` records what each source of the data gave."""
    sequences, sources = calibration_sequences(cfg, tokenizer, params, config)
    return batches_for(cfg, sequences, tokenizer, sources)
