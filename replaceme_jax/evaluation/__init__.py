"""Perplexity and zero-shot multiple-choice scoring, following lm-evaluation-harness conventions.

Python API (no files involved; any params/config pair of a family in ``replaceme_jax.models``):

- ``score_requests(params, config, [(context_ids, continuation_ids), ...])``: summed log-probability of
  each continuation and whether greedy decoding reproduces it. Everything else is built on this.
- ``loglikelihoods(params, config, tokenizer, [(context, continuation), ...])``: the same on strings.
- ``perplexity(params, config, tokenizer, text)``, ``multiple_choice(..., items)``, ``lambada(..., pairs)``,
  ``generation_exact_match(..., [(prompt, answer), ...])``: task metrics.
- ``target_logprobs(chunk_logits, vocab_size, targets, chunk)``: the streamed log-softmax under all of it.

Conventions (chosen so that numbers compare with published lm-eval tables and ``MODELS.md``):

- Tokenisation: context and continuation are tokenised separately with no special tokens and the
  continuation's tokens are appended. An empty context becomes the EOS token (lm-eval's rule). When
  context + continuation exceed ``max_length + 1`` tokens, tokens are dropped from the left.
- Perplexity: the text is tokenised once (no BOS) and cut into non-overlapping windows of
  ``max_length`` tokens, each scored on its own: its first token is context only, so a window predicts
  ``max_length - 1`` tokens. A trailing partial window is dropped (a text shorter than one window is
  one window). ``perplexity = exp(total NLL / predicted tokens)``.
- Multiple choice: ``acc`` takes the argmax of the summed log-likelihood; ``acc_norm`` divides it by
  the choice's length in characters without its leading space, as lm-eval's ``len(choice)`` and
  MODELS.md do. The data README says bytes; the two differ only for the < 1% of choices with
  non-ASCII text. WinoGrande (the same continuation after each context) has ``acc`` only.
- LAMBADA: ``acc`` is 1 when greedy decoding produces every token of the last word; ``perplexity``
  is ``exp(-mean per-item log-likelihood)`` (lm-eval's aggregation, per item, not per token).

- Generation (``gen_exact``, ``gen:FILE``, ``--generate``): greedy decoding with the KV-cache sampler of
  ``replaceme_jax.generate``; see ``replaceme_jax.eval_generation``.

Scoring is one jitted function of plain ``jnp`` over right-padded batches. Batch lengths are padded to
32, 48, 64, 96, 128, ... (at most ``max_length``) and every batch has the same number of rows, so a
task compiles a handful of shapes. The model runs without its LM head; the head is applied one
vocabulary chunk at a time (``LOGITS_CHUNK_BYTES`` for the batch's float32 logits and the chunk's
weight rows) inside a streamed log-sum-exp, so memory does not grow with vocabulary x batch x
length. Float32 matmuls use JAX's default precision for the backend (full float32 on CPU; wrap calls
in ``jax.default_matmul_precision("highest")`` to avoid TF32 on GPU).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.eval_generation import (EXACT_MATCH_NEW_TOKENS, GENERATE_ROWS, Generations, bundled_task_file,
                                           exact_match, greedy_continuations)
from replaceme_jax.progress import progress_bar
from replaceme_jax.models import family_for

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_BUCKET = 32

# ---------------------------------------------------------------------------------------------
# Token-level scoring


@dataclasses.dataclass
class Scores:
    """Per-request results of ``score_requests`` plus what throughput needs."""

    logprob: np.ndarray  # [N] float64, summed log-probability of each continuation
    greedy: np.ndarray  # [N] bool, argmax decoding reproduces every continuation token
    num_tokens: np.ndarray  # [N] int, continuation tokens scored (fewer if truncation ate into them)
    input_tokens: int  # real (unpadded) tokens fed to the model
    seconds: float  # wall time, compilation included
    warmup_seconds: float  # time of the batches that compiled a new shape
    warmup_tokens: int

    @property
    def tokens_per_second(self) -> float:
        """Steady-state throughput: batches that compiled a new shape are left out when others exist."""
        tokens, seconds = self.input_tokens - self.warmup_tokens, self.seconds - self.warmup_seconds
        if tokens <= 0 or seconds <= 0:
            tokens, seconds = self.input_tokens, self.seconds
        return tokens / seconds if seconds > 0 else float("nan")


def bucket_length(n: int, max_length: int) -> int:
    """Padded length for a batch whose longest input has ``n`` tokens: the next of 32, 48, 64, 96, 128, ...
    (powers of two and 1.5x them, capped at ``max_length``). Two shapes an octave waste at most a third
    of a batch on padding; on the MC tasks that is ~77% useful tokens against ~66% with powers of two."""
    n = max(int(n), MIN_BUCKET)
    power = 1 << (n - 1).bit_length()
    return min(power * 3 // 4 if power * 3 // 4 >= n else power, max_length)


# One vocabulary chunk (float32 logits of the whole batch plus the chunk's slice of the LM head weight)
# is kept under this many bytes. With a 150k vocabulary, the full [batch, length, vocab] logits of
# 8 x 1024 tokens alone are 5 GB; a 64 MiB chunk costs about what one MLP activation does.
LOGITS_CHUNK_BYTES = 64 << 20
MIN_VOCAB_CHUNK = 128


def vocab_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int = 0,
                     budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Vocabulary ids per chunk so that a chunk's ``[num_tokens, chunk]`` logits and its ``[chunk,
    hidden_size]`` slice of the head weight (copied out of the table), both float32, fit
    ``budget_bytes``: a multiple of 128 (at least 128), at most the vocabulary."""
    per_id = 4 * (max(int(num_tokens), 1) + max(int(hidden_size), 0))
    chunk = budget_bytes // per_id // MIN_VOCAB_CHUNK * MIN_VOCAB_CHUNK
    return int(min(max(chunk, MIN_VOCAB_CHUNK), vocab_size))


def target_logprobs(chunk_logits: Callable[[int | jax.Array, int], jax.Array], vocab_size: int,
                    targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``log_softmax(logits)[n, targets[n]]`` and whether that logit is the row's maximum, for logits
    that are never held whole: ``chunk_logits(start, size)`` gives the ``[N, size]`` logits of
    vocabulary ids ``start .. start + size - 1`` (``size`` static, ``start`` possibly traced).

    One pass over ``vocab_size / chunk`` chunks (a ``lax.scan``; a last shorter chunk when ``chunk``
    does not divide the vocabulary) keeps a running maximum ``m`` and a running ``sum exp(logit - m)``,
    rescaled when ``m`` grows (streamed log-sum-exp), and picks each target's logit from the chunk
    that holds it. Memory: one ``[N, chunk]`` block, whatever the vocabulary. "The target is the
    maximum" differs from argmax only on exact ties (argmax is a slow variadic reduce on XLA:CPU).
    """
    chunk = int(min(max(chunk, 1), vocab_size))
    n = targets.shape[0]
    full, tail = divmod(vocab_size, chunk)

    def update(carry, start, size):
        top, total, picked = carry
        logits = chunk_logits(start, size).astype(jnp.float32)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=-1)
        local = targets - start
        inside = (local >= 0) & (local < size)
        value = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        return new_top, total, jnp.where(inside, value, picked)

    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    if full == 1:
        carry = update(carry, 0, chunk)
    else:
        carry, _ = jax.lax.scan(lambda c, i: (update(c, i * chunk, chunk), None), carry,
                                jnp.arange(full, dtype=jnp.int32))
    if tail:
        carry = update(carry, full * chunk, tail)
    top, total, picked = carry
    return picked - (top + jnp.log(total)), picked >= top


def head_chunks(params, config, normed: jax.Array) -> Callable[[int | jax.Array, int], jax.Array]:
    """``chunk_logits(start, size)`` for ``target_logprobs``: the family's LM head applied to ``normed``
    [N, D] with only vocabulary rows ``start .. start + size - 1`` of its weight (the tied embedding or
    the untied kernel); what the head does per logit (a soft cap, say) is kept."""
    lm_head = family_for(config.model_type).lm_head

    def chunk_logits(start, size):
        if config.tie_word_embeddings:
            rows = jax.lax.dynamic_slice_in_dim(params["embed_tokens"]["embedding"], start, size, axis=0)
            head = {"embed_tokens": {"embedding": rows}}
        else:
            cols = jax.lax.dynamic_slice_in_dim(params["lm_head"]["kernel"], start, size, axis=1)
            head = {"lm_head": {"kernel": cols}}
        return lm_head(head, config, normed[None])[0]

    return chunk_logits


@functools.partial(jax.jit, static_argnames=("config", "vocab_chunk"))
def _score_batch(params, input_ids, attention_mask, targets, target_mask, *, config, vocab_chunk):
    family = family_for(config.model_type)
    hidden = family.forward(params, config, input_ids, attention_mask, compute_logits=False).hidden_states[-1]
    b, s, d = hidden.shape
    normed = family.final_norm(params, config, hidden).reshape(b * s, d)
    logprob, is_top = target_logprobs(head_chunks(params, config, normed), config.vocab_size, targets.reshape(-1),
                                      vocab_chunk)
    logprob = jnp.sum(jnp.where(target_mask, logprob.reshape(b, s), 0.0), axis=-1)
    greedy = jnp.all(is_top.reshape(b, s) | ~target_mask, axis=-1)
    return logprob, greedy


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total, desc, unit="seq", enabled=enabled, leave=False)


def score_requests(
    params,
    config,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
    vocab_chunk: int | None = None,
) -> Scores:
    """Summed log-probability of each continuation given its context, on token ids.

    Each sequence ``context + continuation`` keeps its last ``max_length + 1`` tokens; the model reads
    all but the last and predicts the continuation's tokens. Requests are sorted by length so that a
    batch pads little, and put back in order. The log-softmax streams over the vocabulary in chunks of
    ``vocab_chunk`` ids (default: ``vocab_chunk_size`` of the batch, under ``LOGITS_CHUNK_BYTES``), so
    full-vocabulary logits are never held for a batch.
    """
    if max_length < 2 or batch_size < 1:
        raise UsageError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
    sequences, n_targets = [], []
    for i, (context, continuation) in enumerate(requests):
        if len(continuation) == 0:
            raise ReplaceMeError(f"request {i}: the continuation has no tokens")
        if len(context) == 0:
            raise ReplaceMeError(f"request {i}: the context has no tokens (start it with a BOS or EOS token)")
        tokens = np.concatenate([np.asarray(context, np.int64), np.asarray(continuation, np.int64)])
        tokens = tokens[-(max_length + 1):]
        if tokens.min() < 0 or tokens.max() >= config.vocab_size:
            raise ReplaceMeError(f"request {i}: token id outside the model's vocabulary of {config.vocab_size}")
        sequences.append(tokens.astype(np.int32))
        n_targets.append(min(len(continuation), len(tokens) - 1))
    n = len(sequences)
    logprob, greedy = np.zeros(n, np.float64), np.zeros(n, bool)
    if n == 0:
        return Scores(logprob, greedy, np.zeros(0, int), 0, 0.0, 0.0, 0)

    # A fixed row count per task (padded with empty rows) keeps the compiled shapes few.
    rows = min(batch_size, 1 << (n - 1).bit_length())
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    batches = [order[i:i + rows] for i in range(0, n, rows)]
    seen_shapes: set[int] = set()
    input_tokens = warmup_tokens = 0
    warmup_seconds = 0.0
    start = time.perf_counter()
    pending = None  # (indices, device results): fetched after the next batch is dispatched

    def collect(item):
        indices, (lp, gr) = item
        logprob[indices] = np.asarray(lp)[: len(indices)]
        greedy[indices] = np.asarray(gr)[: len(indices)]
        bar.update(len(indices))

    with _progress(n, desc, progress) as bar:
        for indices in batches:
            interrupt.check()
            length = bucket_length(max(len(sequences[i]) - 1 for i in indices), max_length)
            ids = np.zeros((rows, length), np.int32)
            mask = np.zeros((rows, length), np.int32)
            targets = np.zeros((rows, length), np.int32)
            target_mask = np.zeros((rows, length), bool)
            for row, i in enumerate(indices):
                seq, k = sequences[i], n_targets[i]
                m = len(seq) - 1
                ids[row, :m], mask[row, :m], targets[row, :m] = seq[:-1], 1, seq[1:]
                target_mask[row, m - k:m] = True
            batch_tokens = int(mask.sum())
            input_tokens += batch_tokens
            new_shape = length not in seen_shapes
            if new_shape:  # time compile + first run apart, so that steady-state throughput is measurable
                if pending is not None:
                    collect(pending)
                    pending = None
                t0 = time.perf_counter()
            chunk = vocab_chunk or vocab_chunk_size(rows * length, config.vocab_size, config.hidden_size)
            result = _score_batch(params, ids, mask, targets, target_mask, config=config, vocab_chunk=chunk)
            if new_shape:
                jax.block_until_ready(result)
                warmup_seconds += time.perf_counter() - t0
                warmup_tokens += batch_tokens
                seen_shapes.add(length)
            if pending is not None:
                collect(pending)
            pending = (indices, result)
        collect(pending)
    seconds = time.perf_counter() - start
    return Scores(logprob, greedy, np.asarray(n_targets), input_tokens, seconds, warmup_seconds, warmup_tokens)


# ---------------------------------------------------------------------------------------------
# String-level API


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens."""
    if not texts:
        return []
    # verbose=False: long documents are meant to exceed the tokenizer's model_max_length here.
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def _empty_context_ids(tokenizer) -> list[int]:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise ReplaceMeError("an empty context needs an EOS or BOS token, and the tokenizer has neither")
    return [int(token)]


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) strings -> token ids, each side tokenised on its own (MODELS.md)."""
    contexts = sorted({c for c, _ in pairs})
    continuations = sorted({c for _, c in pairs})
    context_ids = dict(zip(contexts, encode(tokenizer, contexts)))
    continuation_ids = dict(zip(continuations, encode(tokenizer, continuations)))
    out = []
    for i, (context, continuation) in enumerate(pairs):
        ctx = context_ids[context] or _empty_context_ids(tokenizer)
        cont = continuation_ids[continuation]
        if not cont:
            raise ReplaceMeError(f"request {i}: continuation {continuation!r} has no tokens")
        out.append((ctx, cont))
    return out


def loglikelihoods(params, config, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 1024,
                   batch_size: int = 8, progress: bool = False, desc: str = "scoring") -> Scores:
    """``score_requests`` on (context, continuation) strings."""
    return score_requests(params, config, tokenize_pairs(tokenizer, pairs), max_length=max_length,
                          batch_size=batch_size, progress=progress, desc=desc)


@dataclasses.dataclass
class TaskResult:
    metrics: dict  # metric -> value, and "n": items (windows for perplexity)
    scores: Scores | None  # per-request detail and timing (scoring tasks)
    generations: Generations | None = None  # each item's greedy continuation and timing (generation tasks)

    def timing(self) -> dict:
        """Wall time and throughput: input tokens for scoring tasks, generated tokens for generation tasks."""
        if self.generations is not None:
            g = self.generations
            return {"seconds": round(g.seconds, 3), "new_tokens": g.new_tokens,
                    "tokens_per_second": round(g.tokens_per_second, 1)}
        s = self.scores
        return {"seconds": round(s.seconds, 3), "tokens": s.input_tokens,
                "tokens_per_second": round(s.tokens_per_second, 1)}


def perplexity_windows(token_ids: Sequence[int], window: int) -> list[np.ndarray]:
    """Non-overlapping windows of ``window`` tokens; the trailing partial one is dropped."""
    ids = np.asarray(token_ids, np.int64)
    full = len(ids) // window
    if full == 0:
        return [ids] if len(ids) >= 2 else []
    return [ids[i * window:(i + 1) * window] for i in range(full)]


def perplexity_of_tokens(params, config, token_ids: Sequence[int], *, max_length: int = 1024,
                         batch_size: int = 8, limit: int | None = None, progress: bool = False,
                         desc: str = "perplexity") -> TaskResult:
    """Perplexity over the first ``limit`` windows of ``max_length`` tokens, each scored on its own."""
    windows = perplexity_windows(token_ids, max_length)[:limit]
    if not windows:
        raise ReplaceMeError("perplexity needs at least 2 tokens of text")
    scores = score_requests(params, config, [(w[:1], w[1:]) for w in windows], max_length=max_length,
                            batch_size=batch_size, progress=progress, desc=desc)
    nll = -scores.logprob.sum() / scores.num_tokens.sum()
    return TaskResult({"perplexity": float(math.exp(nll)), "n": len(windows)}, scores)


def perplexity(params, config, tokenizer, text: str, **kwargs) -> TaskResult:
    """Perplexity of ``text`` tokenised once with no special tokens (see ``perplexity_of_tokens``)."""
    return perplexity_of_tokens(params, config, encode(tokenizer, [text])[0], **kwargs)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: option ``j`` is the pair ``options[j] = (context, continuation)``."""

    options: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...] | None = None  # acc_norm divisors; None: the item has acc only

    @classmethod
    def from_choices(cls, context: str, choices: Sequence[str], gold: int, delimiter: str = " "):
        """The usual shape: one context, ``delimiter + choice`` per option, acc_norm by ``norm_length``."""
        return cls(tuple((context, delimiter + c) for c in choices), gold, tuple(norm_length(c) for c in choices))


def norm_length(choice: str) -> int:
    """acc_norm divisor: characters of the choice without its leading space (lm-eval's ``len(choice)``,
    whose choices never hold the space the prompt puts before them; HellaSwag's files do)."""
    return len(choice[1:] if choice.startswith(" ") else choice)


def multiple_choice(params, config, tokenizer, items: Sequence[MultipleChoiceItem], *, max_length: int = 1024,
                    batch_size: int = 8, progress: bool = False, desc: str = "multiple choice") -> TaskResult:
    """``acc`` (and ``acc_norm`` when every item has norm lengths) over the items."""
    if not items:
        raise ReplaceMeError("multiple_choice needs at least one item")
    pairs = [option for item in items for option in item.options]
    scores = loglikelihoods(params, config, tokenizer, pairs, max_length=max_length, batch_size=batch_size,
                            progress=progress, desc=desc)
    acc, acc_norm, offset = [], [], 0
    with_norm = all(item.norm_lengths is not None for item in items)
    for item in items:
        lls = scores.logprob[offset:offset + len(item.options)]
        offset += len(item.options)
        acc.append(int(np.argmax(lls)) == item.gold)
        if with_norm:
            acc_norm.append(int(np.argmax(lls / np.asarray(item.norm_lengths, np.float64))) == item.gold)
    metrics = {"acc": float(np.mean(acc))}
    if with_norm:
        metrics["acc_norm"] = float(np.mean(acc_norm))
    metrics["n"] = len(items)
    return TaskResult(metrics, scores)


def lambada(params, config, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 1024,
            batch_size: int = 8, progress: bool = False, desc: str = "lambada") -> TaskResult:
    """Greedy accuracy and perplexity of each continuation (give it as scored, leading space included)."""
    if not pairs:
        raise ReplaceMeError("lambada needs at least one item")
    scores = loglikelihoods(params, config, tokenizer, pairs, max_length=max_length, batch_size=batch_size,
                            progress=progress, desc=desc)
    metrics = {"acc": float(scores.greedy.mean()), "perplexity": float(math.exp(-scores.logprob.mean())),
               "n": len(pairs)}
    return TaskResult(metrics, scores)


def generation_exact_match(params, config, tokenizer, items: Sequence[tuple[str, str]], *,
                           max_new_tokens: int = EXACT_MATCH_NEW_TOKENS, batch_size: int = GENERATE_ROWS,
                           progress: bool = False, desc: str = "generation") -> TaskResult:
    """``exact_match``: the share of (prompt, answer) items whose greedy continuation is the answer (see
    ``eval_generation.exact_match``: first line, case and a trailing full stop ignored)."""
    if not items:
        raise ReplaceMeError("generation_exact_match needs at least one item")
    generations = greedy_continuations(params, config, tokenizer, [p for p, _ in items], max_new_tokens=max_new_tokens,
                                       rows=batch_size, progress=progress, desc=desc)
    hits = [exact_match(text, answer) for text, (_, answer) in zip(generations.texts, items)]
    return TaskResult({"exact_match": float(np.mean(hits)), "n": len(items)}, None, generations)


# ---------------------------------------------------------------------------------------------
# Tasks from files


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
             progress: bool = False) -> TaskResult:
    kwargs = dict(max_length=max_length, batch_size=batch_size, progress=progress, desc=task.name)
    if task.kind == "perplexity":
        return perplexity(params, config, tokenizer, task.text, limit=task.limit, **kwargs)
    if task.kind == "lambada":
        return lambada(params, config, tokenizer, task.items, **kwargs)
    if task.kind == "generation":  # short prompts: decoded GENERATE_ROWS at a time, not --batch-size
        return generation_exact_match(params, config, tokenizer, task.items, progress=progress, desc=task.name)
    return multiple_choice(params, config, tokenizer, task.items, **kwargs)


# ---------------------------------------------------------------------------------------------
# Runs over files, reports


def _model_name(src: str, taken: dict) -> str:
    path = Path(src)
    name = (path.stem if path.is_file() else path.resolve().name if path.exists() else src) or src
    base, k = name, 2
    while name in taken:
        name, k = f"{base} ({k})", k + 1
    return name


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a ``--generate`` file: one a line, exactly as written; blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReplaceMeError(f"{path}: no such file (--generate)")
    prompts = [line for line in _read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise ReplaceMeError(f"{path}: no prompts (one a line)")
    return prompts


def run_evaluation(models: Sequence[str], tasks: str | Sequence[str] = (), *, data_dir: str | Path | None = None,
                   limit: int | str | dict | None = None, max_length: int = 1024, batch_size: int = 8,
                   output: str | Path | None = None, progress: bool = True, generate: str | Path | None = None,
                   max_new_tokens: int = 32) -> dict:
    """Evaluate each model on each task, and greedily continue each prompt of ``generate`` (a file, one
    prompt a line) with each model; write the JSON report (and a bar chart beside it) if asked.

    ``limit``: see ``parse_limits`` (one number for every task, or per task). Task files and prompts are
    read and checked before any model is loaded, so a typo fails fast.
    """
    from replaceme_jax.conversion import load_model, load_tokenizer

    if not models:
        raise UsageError("no model given")
    if max_length < 2 or batch_size < 1:
        raise UsageError(f"--max-length must be >= 2 and --batch-size >= 1 (got {max_length}, {batch_size})")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    has_tasks = bool(tasks.strip()) if isinstance(tasks, str) else bool(tasks)
    if not has_tasks and generate is None:
        raise UsageError(f"nothing to evaluate: give --tasks ({TASK_HELP}), --generate FILE, or both")
    names = parse_task_list(tasks) if has_tasks else []
    limits = parse_limits(limit, names)
    loaded_tasks = [load_task(name, data_dir, limits[name]) for name in names]
    prompts = read_prompts(generate) if generate is not None else []
    from replaceme_jax.conversion.model_io import check_model_source

    for src in models:  # a bad second model fails now, not after the first one is scored
        check_model_source(src)
    settings = {"tasks": [t.name for t in loaded_tasks], "files": {t.name: str(t.path) for t in loaded_tasks},
                "limit": limit, "limits": limits, "max_length": max_length, "batch_size": batch_size,
                "backend": jax.default_backend()}
    if generate is not None:
        settings.update(generate=str(generate), max_new_tokens=max_new_tokens)
    report = {"settings": settings, "models": {}}
    continuations = []  # per model, in the order of `models`
    for src in models:
        start = time.perf_counter()
        model = load_model(src)
        tokenizer = load_tokenizer(model)
        config = model.config
        log.info("loaded %s (%d layers) in %.1f s", src, config.num_hidden_layers, time.perf_counter() - start)
        if max_length > config.max_position_embeddings:
            log.warning("%s: --max-length %d exceeds max_position_embeddings %d", src, max_length,
                        config.max_position_embeddings)
        entry = {"path": str(src), "num_hidden_layers": config.num_hidden_layers, "results": {}, "timing": {}}
        for task in loaded_tasks:
            result = run_task(model.params, config, tokenizer, task, max_length=max_length, batch_size=batch_size,
                              progress=progress)
            entry["results"][task.name] = result.metrics
            entry["timing"][task.name] = timing = result.timing()
            if result.generations is not None:
                entry.setdefault("outputs", {})[task.name] = result.generations.texts
            log.info("%s %s: %s (%.1f s, %.0f tokens/s)", src, task.name,
                     ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()), timing["seconds"],
                     timing["tokens_per_second"])
        if prompts:
            generations = greedy_continuations(model.params, config, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               progress=progress, desc="generate")
            continuations.append(generations.texts)
            entry["timing"]["generate"] = TaskResult({}, None, generations).timing()
            log.info("%s: %d greedy continuations (%.1f s)", src, len(prompts), generations.seconds)
        report["models"][_model_name(str(src), report["models"])] = entry
        del model, tokenizer
    if prompts:
        names_by_order = list(report["models"])
        report["generation"] = {"file": str(generate), "max_new_tokens": max_new_tokens, "items": [
            {"prompt": prompt, "continuations": {name: texts[i] for name, texts in zip(names_by_order, continuations)}}
            for i, prompt in enumerate(prompts)]}
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        if _rows(report):
            plot_report(report, output.with_suffix(".png"))
    return report


def _rows(report: dict) -> list[tuple[str, str, int]]:
    """(task, metric, n) in task order, metrics as the first model reports them."""
    first = next(iter(report["models"].values()))["results"]
    return [(task, metric, values.get("n")) for task, values in first.items() for metric in values if metric != "n"]


def markdown_table(report: dict) -> str:
    """Models side by side; every model after the first also shows its score as % of the first's.
    Empty when the report has no task results (``generation_table`` shows continuations)."""
    if not _rows(report):
        return ""
    names = list(report["models"])
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for task, metric, n in _rows(report):
        base = report["models"][names[0]]["results"][task][metric]
        cells = []
        for name in names:
            value = report["models"][name]["results"].get(task, {}).get(metric)
            if value is None:
                cells.append("-")
                continue
            cell = f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"
            if name != names[0]:
                cell += f" ({100 * value / base:.1f}%)" if base else " (-)"
            cells.append(cell)
        lines.append(f"| {task} (n={n}) | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> Path:
    """Grouped bars, one per model: accuracies on the left, perplexities on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["models"])
    rows = _rows(report)
    groups = [("accuracy", [r for r in rows if r[1] != "perplexity"]),
              ("perplexity (lower is better)", [r for r in rows if r[1] == "perplexity"])]
    groups = [g for g in groups if g[1]]
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) * max(1, len(names)) / 2 + 3), 4.5))
    FigureCanvasAgg(fig)  # Agg on a standalone figure: no pyplot, no global backend switch
    width = 0.8 / len(names)
    for index, (title, group) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), index + 1)
        x = np.arange(len(group))
        for k, name in enumerate(names):
            results = report["models"][name]["results"]
            heights = [results.get(task, {}).get(metric, np.nan) for task, metric, _ in group]
            ax.bar(x + (k - (len(names) - 1) / 2) * width, heights, width, label=name)
        ax.set_xticks(x, [f"{task}\n{metric}" for task, metric, _ in group], fontsize=8)
        if title.startswith("perplexity"):
            ax.set_yscale("log")  # a pruned model can be 10^4 times the original: every bar stays visible
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
