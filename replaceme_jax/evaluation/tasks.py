"""Tasks: the built-in task table, reading task files (bundled or in the data directory, ``ppl:``/``mc:``/
``gen:`` files of the user), per-task limits, and ``run_task`` that dispatches a task to its metric.

Every reader checks its file strictly: a malformed row is a one-line error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Callable, Sequence

from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.evaluation.metrics import (MultipleChoiceItem, TaskResult, generation_exact_match, lambada,
                                              multiple_choice, norm_length, perplexity)
from replaceme_jax.evaluation.scoring import Reference

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "eval_tasks"


def bundled_task_file(name: str) -> Path:
    """A task file shipped inside the package, in ``replaceme_jax/eval_tasks/``."""
    return BUNDLED_DIR / name



@dataclasses.dataclass(frozen=True)
class TaskSpec:
    kind: str  # "perplexity" | "multiple_choice" | "lambada" | "generation"
    files: tuple[str, ...]  # names tried in the data directory (in replaceme_jax/eval_tasks/ when bundled)
    prompt: Callable[[str], str] = lambda query: query  # query -> context
    delimiter: str = " "  # put between the context and each choice
    bundled: bool = False  # the file ships with the package


_ANSWER = lambda query: f"{query}\nAnswer:"  # noqa: E731
# Prompts of lm-evaluation-harness, as listed in shared/data/README.md.
TASKS: dict[str, TaskSpec] = {
    "wikitext2": TaskSpec("perplexity", ("wikitext2_test.raw",)),
    "lambada_openai": TaskSpec("lambada", ("lambada_openai.jsonl",)),
    "arc_easy": TaskSpec("multiple_choice", ("arc_easy.jsonl",), _ANSWER),
    "arc_challenge": TaskSpec("multiple_choice", ("arc_challenge.jsonl",), _ANSWER),
    "piqa": TaskSpec("multiple_choice", ("piqa.jsonl",), lambda q: f"{q}Answer:"),  # query ends in "\n"
    "hellaswag": TaskSpec("multiple_choice", ("hellaswag.jsonl",), delimiter=""),  # choices start with " "
    "winogrande": TaskSpec("multiple_choice", ("winogrande.jsonl",)),
    "boolq": TaskSpec("multiple_choice", ("boolq.jsonl",), lambda q: f"{q}?\nAnswer:"),
    "openbookqa": TaskSpec("multiple_choice", ("openbook_qa.jsonl", "openbookqa.jsonl")),
    # 30 few-shot questions with one-word answers (capitals, arithmetic, word knowledge), greedy exact match.
    "gen_exact": TaskSpec("generation", ("gen_exact.jsonl",), bundled=True),
}
TASK_HELP = ", ".join(TASKS) + ", ppl:FILE, mc:FILE, gen:FILE"
PREFIX_KINDS = {"ppl": "perplexity", "mc": "multiple_choice", "gen": "generation"}


@dataclasses.dataclass
class Task:
    """A task read from its file: ``text`` for perplexity, ``items`` otherwise."""

    name: str
    kind: str
    path: Path
    text: str | None = None
    items: list = dataclasses.field(default_factory=list)
    limit: int | None = None  # perplexity: windows to keep (items are cut at load time)


def parse_limits(limit, tasks: Sequence[str]) -> dict[str, int | None]:
    """Per-task limits from ``--limit``: ``N`` (every task), ``TASK=N,...``, or both (``100,wikitext2=8``:
    8 windows of WikiText-2, 100 items of every other task). Also takes an int or a {task: N} dict.
    Bad specs are one-line ``UsageError``s that name the culprit."""
    tasks = list(tasks)
    if limit is None:
        return {t: None for t in tasks}
    if isinstance(limit, dict):
        entries = [(str(k), v) for k, v in limit.items()]
    elif isinstance(limit, int) and not isinstance(limit, bool):
        entries = [(None, limit)]
    elif isinstance(limit, str):
        entries = []
        for part in (p.strip() for p in limit.split(",")):
            if not part:
                raise UsageError(f"--limit {limit!r}: empty entry (use N, TASK=N or a comma-separated mix)")
            task, equals, value = part.rpartition("=")
            task = task.strip() if equals else None
            if task == "":
                raise UsageError(f"--limit {limit!r}: {part!r} names no task (use TASK=N)")
            try:
                entries.append((task, int(value.strip())))
            except ValueError:
                what = f"{part!r}" if task is None else f"{part!r}: {value.strip()!r}"
                raise UsageError(f"--limit {limit!r}: {what} is not a whole number (use N, TASK=N or a comma-separated "
                                 "mix)") from None
    else:
        raise UsageError(f"--limit must be a number, TASK=N,... or a dict, got {type(limit).__name__}")
    default, limits = None, {}
    for task, value in entries:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--limit must be at least 1 (got {value!r}" + (f" for {task})" if task else ")"))
        if task is None:
            if default is not None:
                raise UsageError(f"--limit gives two numbers for every task ({default} and {value})")
            default = value
        elif task not in tasks:
            close = difflib.get_close_matches(task, tasks, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--limit names task {task!r}, which is not in --tasks ({', '.join(tasks) or 'none'})"
                             + hint)
        elif task in limits:
            raise UsageError(f"--limit gives task {task!r} twice")
        else:
            limits[task] = value
    return {t: limits.get(t, default) for t in tasks}


def default_data_dir() -> Path | None:
    """``../shared/data/eval`` relative to the working directory, else relative to the repository root."""
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base / ".." / "shared" / "data" / "eval"
        if candidate.is_dir():
            return candidate.resolve()
    return None


def parse_task_list(tasks: str | Sequence[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise UsageError(f"no tasks given (choose from {TASK_HELP})")
    return names


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReplaceMeError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ReplaceMeError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl_rows(path: Path):
    """(line number, object) for each non-blank line, with errors that name the file and line."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReplaceMeError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReplaceMeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _field(path: Path, number: int, row: dict, key: str, kind: type):
    if key not in row:
        raise ReplaceMeError(f"{path}:{number}: missing field {key!r}")
    value = row[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ReplaceMeError(f"{path}:{number}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _strings(path: Path, number: int, row: dict, key: str, minimum: int) -> list[str]:
    values = _field(path, number, row, key, list)
    if len(values) < minimum or not all(isinstance(v, str) for v in values):
        raise ReplaceMeError(f"{path}:{number}: field {key!r} must be a list of at least {minimum} strings")
    return values


def _gold(path: Path, number: int, row: dict, count: int) -> int:
    gold = _field(path, number, row, "gold", int)
    if not 0 <= gold < count:
        raise ReplaceMeError(f"{path}:{number}: gold {gold} is out of range for {count} choices")
    return gold


def _mc_item(path: Path, number: int, row: dict, spec: TaskSpec | None) -> MultipleChoiceItem:
    """A row of either multiple-choice schema; ``spec`` None means a user file (mc:FILE)."""
    if "context_options" in row:  # WinoGrande: the same continuation after each filled-in context
        contexts = _strings(path, number, row, "context_options", 2)
        continuation = _field(path, number, row, "continuation", str)
        if not continuation.strip():
            raise ReplaceMeError(f"{path}:{number}: empty continuation")
        gold = _gold(path, number, row, len(contexts))
        return MultipleChoiceItem(tuple((c, " " + continuation) for c in contexts), gold)
    query = _field(path, number, row, "query", str)
    choices = _strings(path, number, row, "choices", 2)
    if not all(c.strip() for c in choices):
        raise ReplaceMeError(f"{path}:{number}: empty choice")
    gold = _gold(path, number, row, len(choices))
    if spec is not None:
        return MultipleChoiceItem.from_choices(spec.prompt(query), choices, gold, spec.delimiter)
    # A user file: one space between query and choice unless one side already has the whitespace.
    options = tuple((query, c if c[:1].isspace() or query[-1:].isspace() else " " + c) for c in choices)
    return MultipleChoiceItem(options, gold, tuple(norm_length(c) for c in choices))


def _lambada_pair(path: Path, number: int, row: dict) -> tuple[str, str]:
    context = _field(path, number, row, "context", str)
    word = _field(path, number, row, "continuation", str)
    if not word.strip():
        raise ReplaceMeError(f"{path}:{number}: empty continuation")
    return context, word if word[:1].isspace() else " " + word


def _generation_item(path: Path, number: int, row: dict) -> tuple[str, str]:
    prompt = _field(path, number, row, "prompt", str)
    answer = _field(path, number, row, "answer", str)
    if not answer.strip():
        raise ReplaceMeError(f"{path}:{number}: empty answer")
    return prompt, answer


def _document(path: Path, task_name: str) -> str:
    text = _read_text(path)
    if task_name == "wikitext2":  # shared/data/README.md: CRLF rows, the usual document is "\n\n".join(rows)
        return "\n\n".join(row for row in re.split(r"\r?\n", text) if row)
    if path.suffix == ".jsonl":  # documents {"text": ...}, joined like WikiText paragraphs
        return "\n\n".join(_field(path, number, row, "text", str) for number, row in _jsonl_rows(path))
    return text


def _resolve_file(name: str, data_dir: Path | None) -> Path:
    path = Path(name).expanduser()
    if not path.is_file() and not path.is_absolute() and data_dir is not None and (data_dir / path).is_file():
        path = data_dir / path
    if not path.is_file():
        raise ReplaceMeError(f"{name}: no such file" + (f" (nor in {data_dir})" if data_dir else ""))
    return path


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> Task:
    """Read a task: a name from ``TASKS`` (file in ``data_dir``, or bundled), ``ppl:FILE``, ``mc:FILE`` or
    ``gen:FILE`` (jsonl of ``{"prompt": ..., "answer": ...}``)."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    prefix, _, rest = name.partition(":")
    if rest and prefix in PREFIX_KINDS:
        path = _resolve_file(rest, data_dir)
        spec = None
        kind = PREFIX_KINDS[prefix]
    elif name in TASKS and TASKS[name].bundled:
        spec = TASKS[name]
        kind = spec.kind
        path = bundled_task_file(spec.files[0])
        if not path.is_file():
            raise ReplaceMeError(f"{path}: bundled task file is missing (reinstall the package)")
    elif name in TASKS:
        spec = TASKS[name]
        kind = spec.kind
        if data_dir is None:
            raise ReplaceMeError(f"task {name}: no data directory found (looked for ../shared/data/eval from the "
                                 f"working directory and from {REPO_ROOT}); pass --data-dir")
        if not data_dir.is_dir():
            raise ReplaceMeError(f"{data_dir}: data directory does not exist")
        found = [data_dir / f for f in spec.files if (data_dir / f).is_file()]
        if not found:
            raise ReplaceMeError(f"{data_dir / spec.files[0]}: no such file (needed by task {name})")
        path = found[0]
    else:
        raise UsageError(f"unknown task {name!r} (choose from {TASK_HELP})")

    task = Task(name, kind, path)
    if kind == "perplexity":
        task.text, task.limit = _document(path, name), limit
        if not task.text.strip():
            raise ReplaceMeError(f"{path}: no text")
        return task
    read_item = {"lambada": _lambada_pair, "generation": _generation_item}.get(
        kind, lambda path, number, row: _mc_item(path, number, row, spec))
    for number, row in _jsonl_rows(path):
        if limit is not None and len(task.items) >= limit:
            break
        task.items.append(read_item(path, number, row))
    if not task.items:
        raise ReplaceMeError(f"{path}: no items")
    return task


def run_task(params, config, tokenizer, task: Task, *, max_length: int = 1024, batch_size: int = 8,
             progress: bool = False, reference: Reference | None = None, bos_id: int | None = None) -> TaskResult:
    """The task's metrics for one model; with a ``reference``, scoring tasks add ``kl`` and
    ``top1_agreement`` on their scored tokens (generation tasks score none). ``bos_id``: put in front
    of every scored sequence (``scoring_bos_id``); generation prompts get the tokenizer's own
    special tokens either way."""
    kwargs = dict(max_length=max_length, batch_size=batch_size, progress=progress, desc=task.name,
                  reference=reference, bos_id=bos_id)
    if task.kind == "perplexity":
        return perplexity(params, config, tokenizer, task.text, limit=task.limit, **kwargs)
    if task.kind == "lambada":
        return lambada(params, config, tokenizer, task.items, **kwargs)
    if task.kind == "generation":  # short prompts: decoded GENERATE_ROWS at a time, not --batch-size
        return generation_exact_match(params, config, tokenizer, task.items, progress=progress, desc=task.name)
    return multiple_choice(params, config, tokenizer, task.items, **kwargs)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a ``--generate`` file: one a line, exactly as written; blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReplaceMeError(f"{path}: no such file (--generate)")
    prompts = [line for line in _read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise ReplaceMeError(f"{path}: no prompts (one a line)")
    return prompts
