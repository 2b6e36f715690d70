"""``refine: kl``: a few optax steps on T alone, minimising KL(original || pruned) on calibration tokens.

The lstsq/cosine fits match the hidden state right after the block; what the user sees is the
next-token distribution at the end of the network. This refinement keeps every weight of the model
fixed and moves only T, through the layers after the block and the head, towards the original
model's distribution.

Cost is kept low four ways:
- the layers before the block do not depend on T: their outputs (Y and M of layer ``start - 1``) are
  computed once per batch and cached, as in validation;
- the teacher (the original model) is run once per batch, and only its top-``k`` log-probabilities
  are kept; the KL is that of the distributions coarsened to those ``k`` tokens plus one bucket for
  the rest (a lower bound of the full KL, exact when the teacher's mass sits in its top ``k``);
- the student's logits exist for ``TOKEN_CHUNK`` positions at a time, and the backward pass recomputes
  them and each layer's activations rather than keeping them;
- the gradient is summed over groups of the batch's rows (``TOKENS_AT_ONCE`` tokens), one group after
  another, because XLA keeps every later layer's backward working set at once.

The refined T is kept only if it lowers the held-out perplexity (the caller checks).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from replaceme_jax import interrupt
from replaceme_jax.models import family_for
from replaceme_jax.progress import progress_bar
from replaceme_jax.replaceme.merge import replace_block
from replaceme_jax.replaceme.validation import _prefix, suffix_hidden

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RefineResult:
    T: np.ndarray
    losses: list[float]  # mean KL per step
    steps: int
    seconds: float
    tokens: int


# positions whose full-vocabulary logits exist at once: the logits of a whole batch (8 x 512 x 49,152 float32
# for SmolLM2: 0.8 GB, several times over in the backward pass) set the refinement's peak memory otherwise
TOKEN_CHUNK = 512


def _token_chunks(x: jax.Array, size: int) -> jax.Array:
    """``[N, ...]`` -> ``[ceil(N / size), size, ...]``, zero-padded at the end."""
    count = -(-x.shape[0] // size)
    x = jnp.pad(x, [(0, count * size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(count, size, *x.shape[1:])


def _chunk_log_softmax(params, config, rows: jax.Array) -> jax.Array:
    """Log-probabilities over the vocabulary of ``rows`` [C, D] (final-normed hidden states)."""
    logits = family_for(config.model_type).lm_head(params, config, rows[None])[0]
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "k", "chunk"))
def _teacher_top_k(params, input_ids, attention_mask, *, config, k, chunk=None):
    from replaceme_jax.evaluation.scoring import final_states  # here: compress need not import evaluation to start

    b, s = input_ids.shape
    normed = final_states(params, config, input_ids, attention_mask)
    top = jax.lax.map(lambda rows: jax.lax.top_k(_chunk_log_softmax(params, config, rows), k),
                      _token_chunks(normed, min(chunk or TOKEN_CHUNK, b * s)))
    return tuple(x.reshape(-1, k)[: b * s].reshape(b, s, k) for x in top)


def _coarse_log_probs(logp_top: jax.Array) -> jax.Array:
    """``[..., k]`` log-probabilities -> ``[..., k + 1]`` with the remaining mass as the last entry."""
    rest = jnp.log(jnp.clip(-jnp.expm1(jax.nn.logsumexp(logp_top, axis=-1)), 1e-30, None))
    return jnp.concatenate([logp_top, rest[..., None]], axis=-1)


def kl_loss(params, T, y, m, attention_mask, teacher_logp, teacher_index, token_mask, *, config, start,
            chunk=None):
    """Mean over real tokens of KL(teacher || student), both coarsened to the teacher's top k + rest."""
    total = kl_sum(params, T, y, m, attention_mask, teacher_logp, teacher_index, token_mask, config=config,
                   start=start, chunk=chunk)
    return total / jnp.maximum(jnp.sum(token_mask), 1)


def kl_sum(params, T, y, m, attention_mask, teacher_logp, teacher_index, token_mask, *, config, start, chunk=None):
    """``kl_loss`` times the number of real tokens. The student's logits are computed ``chunk`` positions
    at a time and recomputed in the backward pass, as are every layer's activations, so memory does not
    grow with the batch's full-vocabulary logits."""
    family, chunk = family_for(config.model_type), chunk or TOKEN_CHUNK
    hidden = suffix_hidden(params, T, y, m, attention_mask, config=config, start=start, remat=True)
    b, s, _ = hidden.shape

    @jax.checkpoint
    def chunk_kl(total, chunk_inputs):
        rows, logp, index, mask = chunk_inputs
        student_top = jnp.take_along_axis(_chunk_log_softmax(params, config, rows), index, axis=-1)
        p, q = _coarse_log_probs(logp), _coarse_log_probs(student_top)
        kl = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
        return total + jnp.sum(jnp.where(mask, kl, 0.0)), None

    per_position = (family.final_norm(params, config, hidden), teacher_logp, teacher_index, token_mask)
    chunks = tuple(_token_chunks(x.reshape(b * s, *x.shape[2:]), min(chunk, b * s)) for x in per_position)
    total, _ = jax.lax.scan(chunk_kl, jnp.zeros((), jnp.float32), chunks)
    return total


# tokens whose backward pass runs at once: XLA (CPU) holds the backward working set of every layer after the
# block together, attention's [rows, heads, length, length] buffers among it, rematerialised or not
# (bench/refine_step_memory.py: 3.5 GB for 8 x 512 behind 14 SmolLM2 layers), so the batch's rows go
# through in groups of about this many tokens, one group after another
TOKENS_AT_ONCE = 1024


def kl_loss_and_grad(params, T, y, m, attention_mask, teacher_logp, teacher_index, token_mask, *, config, start,
                     tokens_at_once=None):
    """``kl_loss`` and its gradient in T, the batch's rows taken a group at a time (the same sums)."""
    batch, length = token_mask.shape
    wanted = max(1, (tokens_at_once or TOKENS_AT_ONCE) // length)
    rows = max(r for r in range(1, min(wanted, batch) + 1) if batch % r == 0)

    def group(x):
        return x.reshape(batch // rows, rows, *x.shape[1:])

    def add_group(carry, inputs):
        total, grad = carry
        value, group_grad = jax.value_and_grad(kl_sum, argnums=1)(params, T, *inputs, config=config, start=start)
        return (total + value, grad + group_grad), None

    inputs = tuple(group(x) for x in (y, m, attention_mask, teacher_logp, teacher_index, token_mask))
    (total, grad), _ = jax.lax.scan(add_group, (jnp.zeros((), jnp.float32), jnp.zeros_like(T)), inputs)
    count = jnp.maximum(jnp.sum(token_mask), 1)
    return total / count, grad / count


@functools.partial(jax.jit, static_argnames=("config", "start", "optimizer"), donate_argnames=("T", "opt_state"))
def _step(params, T, opt_state, y, m, attention_mask, teacher_logp, teacher_index, token_mask, *, config, start,
          optimizer):
    loss, grad = kl_loss_and_grad(params, T, y, m, attention_mask, teacher_logp, teacher_index, token_mask,
                                  config=config, start=start)
    updates, opt_state = optimizer.update(grad, opt_state, T)
    return optax.apply_updates(T, updates), opt_state, loss


def batches_for_tokens(batches, tokens: int) -> list:
    """The first batches holding at least ``tokens`` real tokens (all of them if fewer; at least one)."""
    chosen, seen = [], 0
    for batch in batches:
        if chosen and seen >= tokens:
            break
        chosen.append(batch)
        seen += int(np.asarray(batch.attention_mask).sum())
    return chosen


def refine_kl(original_params, original_config, params, config, start: int, end: int, T0: np.ndarray | None,
              batches, *, steps: int, lr: float, top_k: int = 64, progress: bool = True) -> RefineResult:
    """Refine ``T0`` (None: the identity) for block ``(start, end)`` of ``params``/``config`` (the
    model as it is before this block is removed; earlier blocks may be replaced already) against
    ``original_params``/``original_config`` on ``batches``. ``steps`` Adam steps of rate ``lr``,
    cycling over the batches; a step sees one batch, so only the first ``steps`` are cached (and counted
    in ``tokens``): the teacher's pass over the rest would never be used."""
    began = time.perf_counter()
    pruned_params, pruned_config = replace_block(params, config, start, end, None)
    batches = list(batches)[:max(steps, 1)]
    cached, tokens = [], 0
    for batch in batches:
        interrupt.check()
        ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
        y, m = _prefix(params, ids, mask, config=config, start=start)
        top_logp, top_index = _teacher_top_k(original_params, ids, mask, config=original_config, k=top_k)
        token_mask = np.asarray(batch.attention_mask) > 0
        cached.append((y, m, mask, top_logp, top_index, jnp.asarray(token_mask)))
        tokens += int(token_mask.sum())
    dim = config.hidden_size
    T = jnp.asarray(np.eye(dim) if T0 is None else T0, jnp.float32)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(T)
    losses = []
    with progress_bar(steps, "refine T (KL)", unit="step", enabled=progress) as bar:
        for step in range(steps):
            interrupt.check()
            y, m, mask, top_logp, top_index, token_mask = cached[step % len(cached)]
            T, opt_state, loss = _step(pruned_params, T, opt_state, y, m, mask, top_logp, top_index, token_mask,
                                       config=pruned_config, start=start, optimizer=optimizer)
            losses.append(float(loss))
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            bar.update(1)
    T = np.asarray(T, np.float64)
    if not np.all(np.isfinite(T)):
        raise FloatingPointError("refined T is not finite")
    return RefineResult(T=T, losses=losses, steps=steps, seconds=time.perf_counter() - began, tokens=tokens)
