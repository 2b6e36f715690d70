"""Streaming expert statistics of one MoE layer, from the routed tokens only.

Every quantity is a running sum over calibration tokens, so memory is ``O(E * (E + D))`` whatever
the number of tokens. Pad tokens are masked out. Definitions (MOE.md): for expert ``e`` with routed
tokens ``X_e`` (``nu_e = |X_e|``), gate ``g_e(x)`` as the family applies it and output ``f_e(x)``:

- frequency ``nu_e``;
- EAN ``sum_{x in X_e} ||f_e(x)||``;
- REAP ``(1/nu_e) sum_{x in X_e} g_e(x) ||f_e(x)||`` (0 for an expert never routed to);
- router-logit Gram matrix ``sum_x z(x) z(x)^T`` (cosine between experts' logit columns);
- routed gated output sum ``sum_{x in X_e} g_e(x) f_e(x)`` (a cheap output-similarity signal).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.errors import UsageError
from replaceme_jax.models.moe import MoeAux

SALIENCY_METHODS = ("frequency", "ean", "reap")


@dataclasses.dataclass
class ExpertStats:
    tokens: jax.Array  # [] valid tokens seen
    counts: jax.Array  # [E] int32: nu_e
    ean: jax.Array  # [E] sum of ||f_e(x)|| over routed tokens
    reap: jax.Array  # [E] sum of g_e(x) ||f_e(x)|| over routed tokens
    gated_output: jax.Array  # [E, D] sum of g_e(x) f_e(x) over routed tokens
    logit_gram: jax.Array  # [E, E] sum of z(x) z(x)^T over tokens

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])


jax.tree_util.register_dataclass(
    ExpertStats, data_fields=["tokens", "counts", "ean", "reap", "gated_output", "logit_gram"], meta_fields=[])


def init_stats(num_experts: int, hidden_size: int) -> ExpertStats:
    zeros = jnp.zeros((num_experts,), jnp.float32)
    return ExpertStats(tokens=jnp.zeros((), jnp.float32), counts=jnp.zeros((num_experts,), jnp.int32), ean=zeros,
                       reap=zeros, gated_output=jnp.zeros((num_experts, hidden_size), jnp.float32),
                       logit_gram=jnp.zeros((num_experts, num_experts), jnp.float32))


def update_stats(stats: ExpertStats, aux: MoeAux, valid: jax.Array) -> ExpertStats:
    """Add one batch: ``aux`` of a layer over ``T`` tokens, ``valid [T]`` (false for pad tokens)."""
    e = stats.num_experts
    valid = valid.astype(jnp.float32)
    slot_valid = jnp.broadcast_to(valid[:, None], aux.experts.shape).reshape(-1)
    experts = aux.experts.reshape(-1)
    outputs = aux.outputs.astype(jnp.float32).reshape(experts.shape[0], -1)
    gates = aux.gates.astype(jnp.float32).reshape(-1) * slot_valid
    norms = jnp.linalg.norm(outputs, axis=-1) * slot_valid

    def per_expert(values):
        return jax.ops.segment_sum(values, experts, num_segments=e)

    logits = aux.router_logits.astype(jnp.float32) * valid[:, None]
    return ExpertStats(
        tokens=stats.tokens + jnp.sum(valid),
        counts=stats.counts + per_expert(slot_valid.astype(jnp.int32)),
        ean=stats.ean + per_expert(norms),
        reap=stats.reap + per_expert(gates * norms),
        gated_output=stats.gated_output + per_expert(gates[:, None] * outputs),
        logit_gram=stats.logit_gram + jnp.einsum("te,tf->ef", logits, logits, precision="highest"),
    )


def saliency(stats: ExpertStats, method: str) -> np.ndarray:
    """Per-expert saliency ``[E]`` (float64) by ``frequency``, ``ean`` or ``reap``."""
    counts = np.asarray(stats.counts, np.float64)
    if method == "frequency":
        return counts
    if method == "ean":
        return np.asarray(stats.ean, np.float64)
    if method == "reap":
        total = np.asarray(stats.reap, np.float64)
        return np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    raise UsageError(f"unknown saliency {method!r} (choose from {', '.join(SALIENCY_METHODS)})")


def logit_cosine(stats: ExpertStats) -> np.ndarray:
    """Cosine between the experts' router-logit columns over the tokens ``[E, E]``."""
    gram = np.asarray(stats.logit_gram, np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    return np.clip(gram / norms[:, None] / norms[None, :], -1.0, 1.0)


def to_host(stats: ExpertStats) -> dict:
    """The statistics as plain lists/floats for a report or recipe file."""
    return {"tokens": float(stats.tokens), "frequency": np.asarray(stats.counts).tolist(),
            "ean": saliency(stats, "ean").tolist(), "reap": saliency(stats, "reap").tolist()}


@functools.partial(jax.jit, static_argnames=("old_config", "new_config"))
def _reconstruction_sums(old_mlp: dict, new_mlp: dict, x: jax.Array, *, old_config, new_config):
    from replaceme_jax.models.moe import moe_block

    old = moe_block(old_mlp, old_config, x[None])[0].astype(jnp.float32)
    new = moe_block(new_mlp, new_config, x[None])[0].astype(jnp.float32)
    return jnp.sum((new - old) ** 2), jnp.sum(old**2)


def reconstruction_error(old_mlp: dict, new_mlp: dict, config, x: jax.Array, chunk: int = 4096) -> float:
    """``sum ||y_new(x) - y_old(x)||^2 / sum ||y_old(x)||^2`` of a layer's MoE block on tokens ``x [T, D]``
    (the sampled MoE inputs), shared expert included: how much the compressed layer changes its output.
    One compilation per chunk shape serves every layer (the params are arguments, not constants)."""
    old_config = config.with_experts(int(old_mlp["gate"]["kernel"].shape[-1]))
    new_config = config.with_experts(int(new_mlp["gate"]["kernel"].shape[-1]))
    error = energy = 0.0
    for start in range(0, x.shape[0], chunk):
        e, o = _reconstruction_sums(old_mlp, new_mlp, x[start:start + chunk], old_config=old_config,
                                    new_config=new_config)
        error, energy = error + float(e), energy + float(o)
    return error / energy if energy > 0 else 0.0
