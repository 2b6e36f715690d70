"""Token-level scoring: the summed log-probability of continuations, with the LM head streamed over the
vocabulary.

- ``score_requests(params, config, [(context_ids, continuation_ids), ...])``: summed log-probability of
  each continuation and whether greedy decoding reproduces it. Every scoring metric is built on this.
- ``loglikelihoods(params, config, tokenizer, [(context, continuation), ...])``: the same on strings.
- ``target_logprobs(chunk_logits, vocab_size, targets, chunk)``: the streamed log-softmax under all of it.

Tokenisation (lm-evaluation-harness): context and continuation are tokenised separately with no special
tokens and the continuation's tokens are appended. An empty context becomes the EOS token (lm-eval's
rule). When context + continuation exceed ``max_length + 1`` tokens, tokens are dropped from the left.

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
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.models import family_for
from replaceme_jax.progress import progress_bar

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
