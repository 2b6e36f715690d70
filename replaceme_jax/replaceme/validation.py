"""Validating a fitted T on held-out calibration documents before it is used.

Two checks, both on documents the fit never saw:

- Reconstruction error in closed form from the held-out normal equations
  (``NormalEquations.relative_error``): for any T,
  ``||M T - (h_end - Y)||^2 = tr(T^T A T) - 2 tr(T^T B) + ||h_end - Y||^2``; ``T = I`` is plain dropping.
  Recorded for every candidate, for ordinary and first-position rows apart.
- End to end: the perplexity of the held-out sequences through the original model, the model with
  the block dropped (UIDL) and the model with each candidate T folded in. This is what chooses the
  ridge strength (``alpha: auto``) and the first-position row weight (``first_token_rows: auto``),
  and decides whether T beats dropping at all: the closed-form error ranks candidates badly, because
  the attention-sink position dominates perplexity while it is one row in hundreds (BENCHMARKS.md).

In-sample error alone is no guide: 3,650 self-generated rows for a 576 x 576 map fitted with an
in-sample error of 0.061 gave a WikiText-2 perplexity in the hundreds of thousands (issue 11).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.models import family_for
from replaceme_jax.models.llama import run_layers
from replaceme_jax.replaceme.merge import replace_block


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def sequence_nll(params, config, sequences: Sequence[np.ndarray], *, batch_size: int = 8,
                 max_length: int = 1024) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of each whole sequence (its first token is context
    only) and the number of predicted tokens, through the model ``params``/``config``."""
    from replaceme_jax.evaluation import score_requests

    requests = [(s[:1], s[1:]) for s in sequences if len(s) >= 2]
    if not requests:
        return 0.0, 0
    scores = score_requests(params, config, requests, max_length=max(max_length, max(map(len, sequences))),
                            batch_size=batch_size)
    return float(-scores.logprob.sum()), int(scores.num_tokens.sum())


# ---------------------------------------------------------------------------------------------
# End-to-end held-out perplexity, cheap per candidate T


def limit_tokens(sequences: Sequence[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    """Whole sequences, in order, until ``max_tokens`` is reached (at least one)."""
    out, total = [], 0
    for s in sequences:
        if out and total + len(s) > max_tokens:
            break
        out.append(s)
        total += len(s)
    return out


def _next_token_nll(logits: jax.Array, targets: jax.Array, target_mask: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_mask, log_z - picked, 0.0))


@functools.partial(jax.jit, static_argnames=("config", "start"))
def _prefix(params, input_ids, attention_mask, *, config, start):
    """Attention residual Y and MLP branch M of layer ``start - 1``: all a candidate T changes."""
    out = family_for(config.model_type).forward(params, config, input_ids, attention_mask, collect_layers=True,
                                                num_layers=start, compute_logits=False)
    return out.attn_residuals[-1], out.mlp_outputs[-1]


def suffix_hidden(params, T, y, m, attention_mask, *, config, start, precision=None, remat: bool = False):
    """The last hidden state (before the final norm) of the pruned model (``params``/``config``: the block
    already removed) from ``h_start = Y + M T``. ``remat`` recomputes each layer's activations in the
    backward pass instead of keeping them (the refinement's gradient through every later layer)."""
    family = family_for(config.model_type)
    ctx = family.attention_context(config, attention_mask.shape, attention_mask)
    h = (y.astype(jnp.float32) + jnp.einsum("bsd,de->bse", m.astype(jnp.float32), T,
                                             precision=precision)).astype(y.dtype)

    def step(index, layer, h):
        return family.decoder_layer(layer, config, start + index, h, ctx)

    if remat:
        step = jax.checkpoint(step, static_argnums=(0,))
    return run_layers(params["layers"][start:], h, step, None, collect_layers=False, num_layers=None,
                      compute_logits=False).hidden_states[-1]


def suffix_logits(params, T, y, m, attention_mask, *, config, start, precision=None):
    """Logits of the pruned model from ``h_start = Y + M T``: the part of the network a candidate T
    changes (validation)."""
    family = family_for(config.model_type)
    h = suffix_hidden(params, T, y, m, attention_mask, config=config, start=start, precision=precision)
    return family.lm_head(params, config, family.final_norm(params, config, h))


@functools.partial(jax.jit, static_argnames=("config", "start"))
def _suffix_nll(params, T, y, m, attention_mask, targets, target_mask, *, config, start):
    """NLL through the pruned model from ``h_start = Y + M T``."""
    logits = suffix_logits(params, T, y, m, attention_mask, config=config, start=start,
                           precision=jax.lax.Precision.HIGHEST)
    return _next_token_nll(logits, targets, target_mask)


class HeldoutEvaluator:
    """Perplexity of held-out sequences through ``params`` with block ``(start, end)`` replaced by T.

    Layers before the block do not depend on T: their output at layer ``start - 1`` (Y and M) is
    computed once, and each candidate T runs only ``h = Y + M T`` and the layers after the block.
    """

    def __init__(self, params, config, start: int, end: int, batches):
        self.start = start
        self.pruned_params, self.pruned_config = replace_block(params, config, start, end, None)
        self.cached = []
        self.tokens = 0
        with jax.default_matmul_precision("highest"):
            for batch in batches:
                interrupt.check()
                ids, mask = batch.input_ids, batch.attention_mask
                targets = np.zeros_like(ids)
                targets[:, :-1] = ids[:, 1:]
                target_mask = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
                target_mask = np.concatenate([target_mask, np.zeros_like(target_mask[:, :1])], axis=1)
                y, m = _prefix(params, ids, mask, config=config, start=start)
                self.cached.append((y, m, mask, targets, target_mask))
                self.tokens += int(target_mask.sum())

    def perplexity(self, T: np.ndarray | None) -> float:
        dim = self.pruned_config.hidden_size
        if T is not None:  # the map the merge writes (Gemma: the nearest one its post-MLP norm allows)
            T = family_for(self.pruned_config.model_type).realizable_output_map(
                self.pruned_params["layers"][self.start - 1], self.pruned_config, T)
        T = jnp.asarray(np.eye(dim) if T is None else T, jnp.float32)
        total = 0.0
        with jax.default_matmul_precision("highest"):
            for y, m, mask, targets, target_mask in self.cached:
                interrupt.check()
                total += float(_suffix_nll(self.pruned_params, T, y, m, mask, targets, target_mask,
                                           config=self.pruned_config, start=self.start))
        return perplexity(total, self.tokens)


def coordinate_search(evaluate: Callable[[int, int], float], sizes: tuple[int, int],
                      starts: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], dict]:
    """Minimise ``evaluate(i, j)`` over a ``sizes`` grid: from each start, exact line searches along
    each axis in turn until neither axis moves; the best end point wins. Values are computed once.
    Returns the best point and every value computed."""
    seen: dict[tuple[int, int], float] = {}

    def value(point):
        if point not in seen:
            seen[point] = evaluate(*point)
        return seen[point]

    ends = []
    for best in starts:
        moved = True
        while moved:
            moved = False
            for axis in (0, 1):
                line = [tuple(k if a == axis else best[a] for a in (0, 1)) for k in range(sizes[axis])]
                candidate = min(line, key=value)
                if value(candidate) < value(best):
                    best, moved = candidate, True
        ends.append(best)
    return min(ends, key=value), seen
