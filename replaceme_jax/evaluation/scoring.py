"""Token-level scoring: the summed log-probability of continuations, with the LM head streamed over the
vocabulary.

- ``score_requests(params, config, [(context_ids, continuation_ids), ...])``: summed log-probability of
  each continuation and whether greedy decoding reproduces it. Every scoring metric is built on this.
- ``loglikelihoods(params, config, tokenizer, [(context, continuation), ...])``: the same on strings.
- ``target_logprobs(chunk_logits, vocab_size, targets, chunk)``: the streamed log-softmax under all of it.
- ``score_requests(..., reference=Reference(params, config))`` also compares the model with a reference
  on the same scored tokens: ``KL(reference || model)`` of the next-token distributions and whether the
  two argmaxes agree (``reference_divergence``, streamed over the same vocabulary chunks).

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

On a mesh (the ``evaluate`` command's ``--mesh``): batches follow the parameters. When the model's
parameters are sharded over a mesh of several devices (``sharding.shard_params``), each batch is split
over the mesh's batch axes (``sharding.put_batch``) and the row count is rounded up to a multiple of
``data x fsdp``; each request is scored on its own, so the figures are the single device's up to the
order of float32 sums.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.models import family_for
from replaceme_jax.progress import progress_bar
from replaceme_jax.sharding import BATCH_AXES, gather_to_host, put_batch, settle

MIN_BUCKET = 32

# ---------------------------------------------------------------------------------------------
# Token-level scoring


class Reference(NamedTuple):
    """The model that ``score_requests`` compares the scored model with; it must share the vocabulary."""

    params: Any
    config: Any


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
    kl: np.ndarray | None = None  # [N] float64, KL(reference || model) summed over the scored tokens
    top1: np.ndarray | None = None  # [N] int, scored tokens where the model's and the reference's argmax agree

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


def _fold_vocab(update, carry, vocab_size: int, chunk: int):
    """``carry = update(carry, start, size)`` over the vocabulary chunks ``start .. start + size - 1``:
    a ``lax.scan`` over the full chunks, then the shorter tail when ``chunk`` does not divide the vocabulary."""
    full, tail = divmod(vocab_size, chunk)
    if full == 1:
        carry = update(carry, 0, chunk)
    else:
        carry, _ = jax.lax.scan(lambda c, i: (update(c, i * chunk, chunk), None), carry,
                                jnp.arange(full, dtype=jnp.int32))
    if tail:
        carry = update(carry, full * chunk, tail)
    return carry


def _logsumexp_step(top, total, logits):
    """One chunk of a streamed log-sum-exp: the new running maximum, ``sum exp(logit - maximum)`` so far,
    the factor that rescaled the old sum, and the chunk's own maximum."""
    chunk_top = jnp.max(logits, axis=-1)
    new_top = jnp.maximum(top, chunk_top)
    scale = jnp.exp(top - new_top)
    return new_top, total * scale + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=-1), scale, chunk_top


def _pick(logits, targets, start, size, picked):
    """``picked`` with each target's logit taken from the chunk ``start .. start + size - 1`` if it is there."""
    local = targets - start
    inside = (local >= 0) & (local < size)
    value = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(inside, value, picked)


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

    def update(carry, start, size):
        top, total, picked = carry
        logits = chunk_logits(start, size).astype(jnp.float32)
        top, total, _, _ = _logsumexp_step(top, total, logits)
        return top, total, _pick(logits, targets, start, size, picked)

    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    top, total, picked = _fold_vocab(update, carry, vocab_size, chunk)
    return picked - (top + jnp.log(total)), picked >= top


def reference_divergence(chunk_logits: Callable[[int | jax.Array, int], jax.Array],
                         reference_chunk_logits: Callable[[int | jax.Array, int], jax.Array], vocab_size: int,
                         targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``target_logprobs`` of the model, plus per row ``KL(reference || model)`` of the two next-token
    distributions and whether the two argmaxes agree, in one pass over the vocabulary chunks of both
    (``chunk_logits`` as in ``target_logprobs``; the same ids for both models).

    With reference logits ``a`` (``p = softmax(a)``) and model logits ``b``,
    ``KL = sum_v p_v (a_v - b_v) - logsumexp(a) + logsumexp(b)``; the sum runs as
    ``sum_v exp(a_v - m_a) (a_v - b_v)``, rescaled with the reference's running maximum ``m_a`` like its
    log-sum-exp. Argmaxes: the first id holding the running maximum (ties go to the lower id, as
    ``argmax``), found with two plain reductions per chunk. Memory: one ``[N, chunk]`` block per model.
    """
    chunk = int(min(max(chunk, 1), vocab_size))
    n = targets.shape[0]

    def first_max(logits, chunk_top, start, size, top, arg):
        ids = jnp.arange(size, dtype=jnp.int32)
        first = jnp.min(jnp.where(logits == chunk_top[:, None], ids, size), axis=-1) + start
        return jnp.where(chunk_top > top, first, arg)

    def update(carry, start, size):
        (top_q, total_q, picked, arg_q), (top_p, total_p, cross, arg_p) = carry
        b = chunk_logits(start, size).astype(jnp.float32)
        a = reference_chunk_logits(start, size).astype(jnp.float32)
        new_top_q, total_q, _, chunk_top_q = _logsumexp_step(top_q, total_q, b)
        new_top_p, total_p, scale, chunk_top_p = _logsumexp_step(top_p, total_p, a)
        cross = cross * scale + jnp.sum(jnp.exp(a - new_top_p[:, None]) * (a - b), axis=-1)
        model = (new_top_q, total_q, _pick(b, targets, start, size, picked),
                 first_max(b, chunk_top_q, start, size, top_q, arg_q))
        return model, (new_top_p, total_p, cross, first_max(a, chunk_top_p, start, size, top_p, arg_p))

    def start_carry():
        return (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32),
                jnp.zeros((n,), jnp.int32))

    (top_q, total_q, picked, arg_q), (top_p, total_p, cross, arg_p) = _fold_vocab(
        update, (start_carry(), start_carry()), vocab_size, chunk)
    log_z_q, log_z_p = top_q + jnp.log(total_q), top_p + jnp.log(total_p)
    # KL >= 0; float32 rounding of the three terms can leave a few ulps below zero when the models agree.
    kl = jnp.maximum(cross / total_p - log_z_p + log_z_q, 0.0)
    return picked - log_z_q, picked >= top_q, kl, arg_q == arg_p


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


def final_states(params, config, input_ids, attention_mask) -> jax.Array:
    """The last hidden states after the final norm, ``[batch * length, hidden]``: what the LM head reads."""
    family = family_for(config.model_type)
    hidden = family.forward(params, config, input_ids, attention_mask, compute_logits=False).hidden_states[-1]
    b, s, d = hidden.shape
    return family.final_norm(params, config, hidden).reshape(b * s, d)


def _row_sums(target_mask, logprob, is_top):
    """Per row: the summed log-probability of its targets, and whether each target is the argmax."""
    logprob = jnp.sum(jnp.where(target_mask, logprob.reshape(target_mask.shape), 0.0), axis=-1)
    greedy = jnp.all(is_top.reshape(target_mask.shape) | ~target_mask, axis=-1)
    return logprob, greedy


@functools.partial(jax.jit, static_argnames=("config", "vocab_chunk"))
def _score_batch(params, input_ids, attention_mask, targets, target_mask, *, config, vocab_chunk):
    normed = final_states(params, config, input_ids, attention_mask)
    logprob, is_top = target_logprobs(head_chunks(params, config, normed), config.vocab_size, targets.reshape(-1),
                                      vocab_chunk)
    return _row_sums(target_mask, logprob, is_top)


@functools.partial(jax.jit, static_argnames=("config", "reference_config", "vocab_chunk"))
def _compare_batch(params, reference_params, input_ids, attention_mask, targets, target_mask, *, config,
                   reference_config, vocab_chunk):
    """``_score_batch`` plus, per row, KL(reference || model) summed over the targets and the number of
    targets where both models' argmax agree."""
    heads = [head_chunks(p, c, final_states(p, c, input_ids, attention_mask))
             for p, c in ((params, config), (reference_params, reference_config))]
    logprob, is_top, kl, agree = reference_divergence(*heads, config.vocab_size, targets.reshape(-1), vocab_chunk)
    kl = jnp.sum(jnp.where(target_mask, kl.reshape(target_mask.shape), 0.0), axis=-1)
    agree = jnp.sum(target_mask & agree.reshape(target_mask.shape), axis=-1)
    return (*_row_sums(target_mask, logprob, is_top), kl, agree)


def params_mesh(params):
    """The mesh that ``params`` are sharded over, if it has several devices and the batch axes; else None."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and mesh.size > 1 and all(a in mesh.shape for a in BATCH_AXES):
            return mesh
    return None


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
    reference: Reference | None = None,
) -> Scores:
    """Summed log-probability of each continuation given its context, on token ids.

    Each sequence ``context + continuation`` keeps its last ``max_length + 1`` tokens; the model reads
    all but the last and predicts the continuation's tokens. Requests are sorted by length so that a
    batch pads little, and put back in order. The log-softmax streams over the vocabulary in chunks of
    ``vocab_chunk`` ids (default: ``vocab_chunk_size`` of the batch, under ``LOGITS_CHUNK_BYTES``), so
    full-vocabulary logits are never held for a batch.

    With a ``reference`` (same vocabulary), both models read the same batches and ``Scores.kl`` /
    ``Scores.top1`` hold, per request, ``KL(reference || model)`` summed over the scored tokens and the
    number of those where the two argmaxes agree; the default chunk then keeps both models' logits and
    head slices under ``LOGITS_CHUNK_BYTES`` together.
    """
    if max_length < 2 or batch_size < 1:
        raise UsageError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
    if reference is not None and reference.config.vocab_size != config.vocab_size:
        raise ReplaceMeError(f"the reference has a vocabulary of {reference.config.vocab_size} tokens and the model "
                             f"{config.vocab_size}: comparing them needs the same tokenizer")
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
    kl, top1 = (np.zeros(n, np.float64), np.zeros(n, np.int64)) if reference is not None else (None, None)
    if n == 0:
        return Scores(logprob, greedy, np.zeros(0, int), 0, 0.0, 0.0, 0, kl, top1)

    # A fixed row count per task (padded with empty rows) keeps the compiled shapes few.
    rows = min(batch_size, 1 << (n - 1).bit_length())
    mesh = params_mesh(params)
    if mesh is not None:  # every device of the batch axes gets the same number of rows
        ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        rows = -(-rows // ways) * ways

    def put(array: np.ndarray):
        return array if mesh is None else put_batch(array, mesh)

    order = np.argsort([-len(s) for s in sequences], kind="stable")
    batches = [order[i:i + rows] for i in range(0, n, rows)]
    seen_shapes: set[int] = set()
    input_tokens = warmup_tokens = 0
    warmup_seconds = 0.0
    start = time.perf_counter()
    pending = None  # (indices, device results): fetched after the next batch is dispatched

    def collect(item):
        indices, results = item
        for out, values in zip((logprob, greedy, kl, top1), results):
            out[indices] = gather_to_host(values)[: len(indices)]  # all-gathered when spread over processes
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
            if reference is None:
                chunk = vocab_chunk or vocab_chunk_size(rows * length, config.vocab_size, config.hidden_size)
                result = _score_batch(params, put(ids), put(mask), put(targets), put(target_mask), config=config,
                                      vocab_chunk=chunk)
            else:  # two [tokens, chunk] blocks of logits and two head slices share the budget
                chunk = vocab_chunk or vocab_chunk_size(2 * rows * length, config.vocab_size,
                                                        config.hidden_size + reference.config.hidden_size)
                result = _compare_batch(params, reference.params, put(ids), put(mask), put(targets), put(target_mask),
                                        config=config, reference_config=reference.config, vocab_chunk=chunk)
            result = settle(result)  # one multi-device program at a time on simulated CPU devices
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
    return Scores(logprob, greedy, np.asarray(n_targets), input_tokens, seconds, warmup_seconds, warmup_tokens, kl,
                  top1)


# ---------------------------------------------------------------------------------------------
# String-level API


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens."""
    if not texts:
        return []
    # verbose=False: long documents are meant to exceed the tokenizer's model_max_length here.
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


# lm-evaluation-harness (HFLM) puts a BOS in front of every scored sequence for these model types, which
# are trained with one; for the others it scores text as it is (our convention, and the reference's).
BOS_MODEL_TYPES = ("gemma",)


def check_bos(bos) -> None:
    if bos not in ("auto", True, False):
        raise UsageError(f"bos must be auto, always or never (got {bos!r})")


def scoring_bos_id(config, tokenizer, bos: str | bool = "auto") -> int | None:
    """The token put in front of every scored sequence, or None. ``auto``: the tokenizer's BOS for the
    model types of ``BOS_MODEL_TYPES`` (Gemma), none for the others; ``True``/``False``: always/never."""
    check_bos(bos)
    wanted = bos if bos != "auto" else config.model_type.startswith(BOS_MODEL_TYPES)
    if not wanted:
        return None
    if tokenizer.bos_token_id is None:
        if bos is True:
            raise ReplaceMeError("a BOS token was asked for, and the tokenizer has none")
        return None
    return int(tokenizer.bos_token_id)


def _empty_context_ids(tokenizer) -> list[int]:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise ReplaceMeError("an empty context needs an EOS or BOS token, and the tokenizer has neither")
    return [int(token)]


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]],
                   bos_id: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) strings -> token ids, each side tokenised on its own (MODELS.md);
    ``bos_id`` goes in front of every context (an empty one is then the BOS alone)."""
    contexts = sorted({c for c, _ in pairs})
    continuations = sorted({c for _, c in pairs})
    context_ids = dict(zip(contexts, encode(tokenizer, contexts)))
    continuation_ids = dict(zip(continuations, encode(tokenizer, continuations)))
    out = []
    for i, (context, continuation) in enumerate(pairs):
        ctx = [bos_id, *context_ids[context]] if bos_id is not None else \
            context_ids[context] or _empty_context_ids(tokenizer)
        cont = continuation_ids[continuation]
        if not cont:
            raise ReplaceMeError(f"request {i}: continuation {continuation!r} has no tokens")
        out.append((ctx, cont))
    return out


def loglikelihoods(params, config, tokenizer, pairs: Sequence[tuple[str, str]], *, max_length: int = 1024,
                   batch_size: int = 8, progress: bool = False, desc: str = "scoring",
                   reference: Reference | None = None, bos_id: int | None = None) -> Scores:
    """``score_requests`` on (context, continuation) strings (``bos_id``: see ``tokenize_pairs``)."""
    return score_requests(params, config, tokenize_pairs(tokenizer, pairs, bos_id), max_length=max_length,
                          batch_size=batch_size, progress=progress, desc=desc, reference=reference)
