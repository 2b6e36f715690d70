"""Task metrics on top of the scores: perplexity, multiple choice, LAMBADA, generation exact match.

- ``perplexity(params, config, tokenizer, text)``, ``multiple_choice(..., items)``, ``lambada(..., pairs)``,
  ``generation_exact_match(..., [(prompt, answer), ...])``: each returns a ``TaskResult``.

Conventions (chosen so that numbers compare with published lm-eval tables and ``MODELS.md``):

- Perplexity: the text is tokenised once (no BOS) and cut into non-overlapping windows of
  ``max_length`` tokens, each scored on its own: its first token is context only, so a window predicts
  ``max_length - 1`` tokens. A trailing partial window is dropped (a text shorter than one window is
  one window). ``perplexity = exp(total NLL / predicted tokens)``.
- Multiple choice: ``acc`` takes the argmax of the summed log-likelihood; ``acc_norm`` divides it by
  the choice's length in characters without its leading space, as lm-eval's ``len(choice)`` and
  MODELS.md do. The data README says bytes; the two differ only for the < 1% of choices with
  non-ASCII text. WinoGrande's options share one continuation, so its ``acc_norm`` equals its ``acc``
  (lm-eval reports ``acc`` only); it is there so that every multiple-choice task has both.
- LAMBADA: ``acc`` is 1 when greedy decoding produces every token of the last word; ``perplexity``
  is ``exp(-mean per-item log-likelihood)`` (lm-eval's aggregation, per item, not per token).
- Every accuracy (``acc``, ``acc_norm``, ``exact_match``) comes with ``<metric>_stderr``, the standard
  error of a mean of n 0/1 outcomes as lm-eval computes it (sample standard deviation / sqrt(n), i.e.
  ``sqrt(p (1 - p) / (n - 1))``); ``None`` when n is 1. ``TaskResult.outcomes`` keeps each item's 0/1
  outcome per accuracy, so two models scored on the same items compare item by item
  (``paired_difference``): far tighter than the two standard errors, because most items go the same
  way for both models.
- Damage against a reference model (``reference=Reference(params, config)``, same vocabulary): ``kl``,
  the mean over scored tokens of ``KL(reference || model)`` of the next-token distributions (nats), and
  ``top1_agreement``, the share of scored tokens where both models' argmax is the same token. The
  scored tokens are exactly those the task's log-likelihoods read: every predicted token of every
  perplexity window; the continuation tokens of every choice of a multiple-choice item (not only the
  gold one: the wrong choices' likelihoods decide ``acc`` as much as the right one's); LAMBADA's last
  word. Generation tasks score no tokens and get neither.
- Generation (``gen_exact``, ``gen:FILE``): greedy decoding with the KV-cache sampler of
  ``replaceme_jax.generate``; see ``replaceme_jax.evaluation.generation``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.evaluation.generation import (EXACT_MATCH_NEW_TOKENS, GENERATE_ROWS, Generations, exact_match,
                                                 greedy_continuations)
from replaceme_jax.evaluation.scoring import Reference, Scores, encode, loglikelihoods, score_requests


@dataclasses.dataclass
class TaskResult:
    metrics: dict  # metric -> value, and "n": items (windows for perplexity)
    scores: Scores | None  # per-request detail and timing (scoring tasks)
    generations: Generations | None = None  # each item's greedy continuation and timing (generation tasks)
    outcomes: dict[str, np.ndarray] | None = None  # accuracy -> each item's 0/1 outcome, in item order

    def outcome_lists(self) -> dict[str, list[int]]:
        """``outcomes`` as JSON lists of 0/1 (``{}`` when the task has no accuracy)."""
        return {metric: np.asarray(v).astype(int).tolist() for metric, v in (self.outcomes or {}).items()}

    def timing(self) -> dict:
        """Wall time and throughput: input tokens for scoring tasks, generated tokens for generation tasks."""
        if self.generations is not None:
            g = self.generations
            return {"seconds": round(g.seconds, 3), "new_tokens": g.new_tokens,
                    "tokens_per_second": round(g.tokens_per_second, 1)}
        s = self.scores
        return {"seconds": round(s.seconds, 3), "tokens": s.input_tokens,
                "tokens_per_second": round(s.tokens_per_second, 1)}


def binomial_stderr(outcomes: Sequence[bool]) -> float | None:
    """Standard error of the mean of 0/1 ``outcomes``: lm-eval's ``mean_stderr`` (sample standard
    deviation over sqrt(n)), which is ``sqrt(p (1 - p) / (n - 1))``; ``None`` for fewer than 2."""
    n = len(outcomes)
    if n < 2:
        return None
    p = float(np.mean(outcomes))
    return math.sqrt(p * (1.0 - p) / (n - 1))


def accuracy(name: str, outcomes: Sequence[bool]) -> dict:
    """``{name: mean, name_stderr: binomial_stderr}`` of 0/1 outcomes."""
    return {name: float(np.mean(outcomes)), f"{name}_stderr": binomial_stderr(outcomes)}


def paired_difference(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """``second``'s accuracy minus ``first``'s on the same items, and its standard error: the standard
    error of the mean of the per-item differences (each -1, 0 or 1; sample standard deviation over
    sqrt(n), as ``binomial_stderr``), ``None`` for fewer than 2 items."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if a.shape != b.shape:
        raise ReplaceMeError(f"a paired difference needs the same items ({a.size} and {b.size} outcomes)")
    diff = b - a
    stderr = float(np.std(diff, ddof=1) / math.sqrt(diff.size)) if diff.size >= 2 else None
    return {"difference": float(diff.mean()), "stderr": stderr}


def divergence(scores: Scores) -> dict:
    """``kl`` and ``top1_agreement`` per scored token of scores taken with a reference; ``{}`` without one."""
    if scores.kl is None:
        return {}
    tokens = int(scores.num_tokens.sum())
    return {"kl": float(scores.kl.sum() / tokens), "top1_agreement": float(scores.top1.sum() / tokens)}


def perplexity_windows(token_ids: Sequence[int], window: int) -> list[np.ndarray]:
    """Non-overlapping windows of ``window`` tokens; the trailing partial one is dropped."""
    ids = np.asarray(token_ids, np.int64)
    full = len(ids) // window
    if full == 0:
        return [ids] if len(ids) >= 2 else []
    return [ids[i * window:(i + 1) * window] for i in range(full)]


def perplexity_of_tokens(params, config, token_ids: Sequence[int], *, max_length: int = 1024,
                         batch_size: int = 8, limit: int | None = None, progress: bool = False,
                         desc: str = "perplexity", reference: Reference | None = None,
                         bos_id: int | None = None) -> TaskResult:
    """Perplexity over the first ``limit`` windows of ``max_length`` tokens, each scored on its own:
    its first token is context only; with ``bos_id``, windows of ``max_length - 1`` tokens are scored
    whole after the BOS (lm-evaluation-harness's rolling windows for models trained with one)."""
    windows = perplexity_windows(token_ids, max_length - (bos_id is not None))[:limit]
    if not windows:
        raise ReplaceMeError("perplexity needs at least 2 tokens of text")
    requests = [([bos_id], w) for w in windows] if bos_id is not None else [(w[:1], w[1:]) for w in windows]
    scores = score_requests(params, config, requests, max_length=max_length,
                            batch_size=batch_size, progress=progress, desc=desc, reference=reference)
    nll = -scores.logprob.sum() / scores.num_tokens.sum()
    return TaskResult({"perplexity": float(math.exp(nll)), **divergence(scores), "n": len(windows)}, scores)


def perplexity(params, config, tokenizer, text: str, **kwargs) -> TaskResult:
    """Perplexity of ``text`` tokenised once with no special tokens (see ``perplexity_of_tokens``)."""
    return perplexity_of_tokens(params, config, encode(tokenizer, [text])[0], **kwargs)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: option ``j`` is the pair ``options[j] = (context, continuation)``."""

    options: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...] | None = None  # acc_norm divisors; None: each continuation's norm_length

    def divisors(self) -> np.ndarray:
        """acc_norm's divisor of each option: ``norm_lengths``, else each continuation's ``norm_length``."""
        lengths = self.norm_lengths or tuple(norm_length(continuation) for _, continuation in self.options)
        return np.maximum(np.asarray(lengths, np.float64), 1.0)  # an option of spaces only: not a division by 0

    @classmethod
    def from_choices(cls, context: str, choices: Sequence[str], gold: int, delimiter: str = " "):
        """The usual shape: one context, ``delimiter + choice`` per option, acc_norm by ``norm_length``."""
        return cls(tuple((context, delimiter + c) for c in choices), gold, tuple(norm_length(c) for c in choices))


def norm_length(choice: str) -> int:
    """acc_norm divisor: characters of the choice without its leading space (lm-eval's ``len(choice)``,
    whose choices never hold the space the prompt puts before them; HellaSwag's files do)."""
    return len(choice[1:] if choice.startswith(" ") else choice)


def multiple_choice(params, config, tokenizer, items: Sequence[MultipleChoiceItem], *, max_length: int = 1024,
                    batch_size: int = 8, progress: bool = False, desc: str = "multiple choice",
                    reference: Reference | None = None, bos_id: int | None = None) -> TaskResult:
    """``acc`` and ``acc_norm`` over the items, each with its standard error."""
    if not items:
        raise ReplaceMeError("multiple_choice needs at least one item")
    pairs = [option for item in items for option in item.options]
    scores = loglikelihoods(params, config, tokenizer, pairs, max_length=max_length, batch_size=batch_size,
                            progress=progress, desc=desc, reference=reference, bos_id=bos_id)
    acc, acc_norm, offset = [], [], 0
    for item in items:
        lls = scores.logprob[offset:offset + len(item.options)]
        offset += len(item.options)
        acc.append(int(np.argmax(lls)) == item.gold)
        acc_norm.append(int(np.argmax(lls / item.divisors())) == item.gold)
    return TaskResult({**accuracy("acc", acc), **accuracy("acc_norm", acc_norm), **divergence(scores),
                       "n": len(items)}, scores, outcomes={"acc": np.asarray(acc), "acc_norm": np.asarray(acc_norm)})


def lambada(params, config, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 1024,
            batch_size: int = 8, progress: bool = False, desc: str = "lambada",
            reference: Reference | None = None, bos_id: int | None = None) -> TaskResult:
    """Greedy accuracy and perplexity of each continuation (give it as scored, leading space included)."""
    if not pairs:
        raise ReplaceMeError("lambada needs at least one item")
    scores = loglikelihoods(params, config, tokenizer, pairs, max_length=max_length, batch_size=batch_size,
                            progress=progress, desc=desc, reference=reference, bos_id=bos_id)
    metrics = {**accuracy("acc", scores.greedy), "perplexity": float(math.exp(-scores.logprob.mean())),
               **divergence(scores), "n": len(pairs)}
    return TaskResult(metrics, scores, outcomes={"acc": np.asarray(scores.greedy, bool)})


def generation_exact_match(params, config, tokenizer, items: Sequence[tuple[str, str]], *,
                           max_new_tokens: int = EXACT_MATCH_NEW_TOKENS, batch_size: int = GENERATE_ROWS,
                           progress: bool = False, desc: str = "generation") -> TaskResult:
    """``exact_match``: the share of (prompt, answer) items whose greedy continuation is the answer (see
    ``generation.exact_match``: first line, case and a trailing full stop ignored)."""
    if not items:
        raise ReplaceMeError("generation_exact_match needs at least one item")
    generations = greedy_continuations(params, config, tokenizer, [p for p, _ in items], max_new_tokens=max_new_tokens,
                                       rows=batch_size, progress=progress, desc=desc)
    hits = [exact_match(text, answer) for text, (_, answer) in zip(generations.texts, items)]
    return TaskResult({**accuracy("exact_match", hits), "n": len(items)}, None, generations,
                      outcomes={"exact_match": np.asarray(hits)})
