"""Where calibration text comes from: local files and Hub data sets, their columns, chat formats, and
mixtures of several sources with ratios.

``load_texts`` opens one source and returns its first non-blank texts; ``parse_mixture`` and
``mixture_counts`` validate a mixture and split a number of sequences over it; ``check_sources``
fails early on a missing local file. ``dataset: self`` (text the model writes) is named here
(``SELF_DATASET``) and sampled in ``replaceme_jax.data.self_generated``.
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

log = logging.getLogger(__name__)

# Local files by extension -> `datasets` builder.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
CHAT_FORMATS = ("slimorca",)
SELF_DATASET = "self"

_ROW_CHUNK = 1024  # rows read from a dataset at a time, so `size` rows of a huge set stay cheap


# ---------------------------------------------------------------------------------------------
# Opening a data set


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


# ---------------------------------------------------------------------------------------------
# Columns and chat formats


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


# ---------------------------------------------------------------------------------------------
# One source's texts


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
# Before any model is loaded


def check_sources(dataset: str | Sequence[Mapping[str, Any]]) -> None:
    """Fail at once on a local data file that does not exist (before any model is loaded)."""
    names = [dataset] if isinstance(dataset, str) else [entry.get("dataset") for entry in dataset]
    for name in names:
        if not isinstance(name, str) or name == SELF_DATASET or not _is_local(name):
            continue
        if not Path(name).expanduser().exists():
            raise ReplaceMeError(f"{name}: no such file (calibration dataset)")
