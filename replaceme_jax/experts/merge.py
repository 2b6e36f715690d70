"""REAM: merge the experts of a layer into its most salient ones (MOE.md, "REAM merging").

1. Centroids: the ``N'`` experts with the highest saliency (REAP by default).
2. Distances between experts from router-logit similarity and output similarity.
3. Pseudo-grouping: centroids in decreasing saliency each absorb their nearest unassigned
   non-centroid experts until the group has ``group_size`` members (centroid included); experts
   left when every group is full are dropped (pruned, as in REAP), so ``group_size=1`` is REAP.
   ``group_size=0``: every non-centroid joins its nearest centroid.
4. Each member's intermediate neurons are permuted to match the centroid's (linear assignment on
   activation distance plus PCA weight distance).
5. The group becomes the saliency-weighted average of its aligned members, in float32, written in
   the centroid's slot; the centroid keeps its router column.

Where the paper and the reference code differ, the defaults follow the code that produced the
published checkpoints; the paper's choices are options.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.errors import UsageError
from replaceme_jax.experts.prune import rank_experts
from replaceme_jax.models.moe import MoeConfig, all_expert_outputs

_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ReamOptions:
    group_size: int = 16  # C, centroid included; 0: every dropped expert joins its nearest centroid
    # "reference": 1 - d / max(d), d the distance between L2-normalised logit columns (REAM code);
    # "cosine": (cos + 1) / 2 of the logit columns (the paper's wording).
    router_similarity: Literal["reference", "cosine"] = "reference"
    # "mean": cosine of the experts' gated mean outputs (REAM code); "token_mean": mean over tokens
    # of the per-token cosines (the paper). Both over the token sample, mapped to [0, 1].
    output_similarity: Literal["mean", "token_mean"] = "mean"
    # "activation": neuron activations only, for very wide experts (the weight PCA is the costly part).
    alignment: Literal["activation+weight", "activation", "weight", "none"] = "activation+weight"
    pca_dim: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.group_size < 0:
            raise UsageError(f"group_size must be >= 0 (got {self.group_size})")


# ---------------------------------------------------------------------------------------------
# Similarity


@jax.jit
def _sample_step(mlp: dict, carry, xs):
    mean, cos = carry
    probs = jax.nn.softmax((xs @ mlp["gate"]["kernel"]).astype(jnp.float32), axis=-1)  # [c, E]
    out = all_expert_outputs(mlp["experts"], xs).astype(jnp.float32) * probs.T[:, :, None]  # [E, c, D]
    unit = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return mean + jnp.sum(out, axis=1), cos + jnp.einsum("etd,ftd->ef", unit, unit)


def sample_statistics(mlp: dict, x: jax.Array, chunk: int = 512) -> dict[str, np.ndarray]:
    """Every expert on the sampled MoE inputs ``x [Ns, D]``, gated by the softmax over all experts
    (REAM's ``gated_sim``): mean gated output ``[E, D]`` and mean per-token cosine ``[E, E]``."""
    e = mlp["gate"]["kernel"].shape[-1]
    carry = (jnp.zeros((e, x.shape[-1]), jnp.float32), jnp.zeros((e, e), jnp.float32))
    for start in range(0, x.shape[0], chunk):
        carry = _sample_step(mlp, carry, x[start:start + chunk])
    n = max(int(x.shape[0]), 1)
    return {"mean_gated_output": np.asarray(carry[0], np.float64) / n,
            "token_cosine": np.asarray(carry[1], np.float64) / n}


def _cosine_rows(a: np.ndarray) -> np.ndarray:
    unit = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def expert_distances(logit_cosine: np.ndarray, sample: dict[str, np.ndarray], options: ReamOptions) -> np.ndarray:
    """``1 - (router similarity + output similarity) / 2`` between every pair of experts ``[E, E]``."""
    if options.router_similarity == "reference":
        d = np.sqrt(np.clip(2.0 - 2.0 * logit_cosine, 0.0, None))
        np.fill_diagonal(d, 0.0)
        router = 1.0 - d / d.max() if d.max() > 0 else np.ones_like(d)
    else:
        router = (logit_cosine + 1.0) / 2.0
    if options.output_similarity == "mean":
        output = (_cosine_rows(sample["mean_gated_output"]) + 1.0) / 2.0
    else:
        output = (sample["token_cosine"] + 1.0) / 2.0
    distance = 1.0 - (router + output) / 2.0
    np.fill_diagonal(distance, 0.0)
    return distance


# ---------------------------------------------------------------------------------------------
# Grouping


def pseudo_group(saliency: np.ndarray, distances: np.ndarray, num_keep: int,
                 group_size: int) -> tuple[list[list[int]], list[int]]:
    """Groups (centroid first, then members in the order absorbed), ordered by centroid index, and the
    experts left out of every group (dropped)."""
    n = len(saliency)
    centroids = [int(c) for c in rank_experts(saliency)[:num_keep]]
    groups = {c: [c] for c in centroids}
    unassigned = set(range(n)) - set(centroids)
    if group_size == 0:
        for j in sorted(unassigned):
            nearest = centroids[int(np.argmin(distances[centroids, j]))]  # ties: the more salient centroid
            groups[nearest].append(j)
        unassigned = set()
    else:
        for c in centroids:
            if not unassigned:
                break
            for j in np.argsort(distances[c], kind="stable"):
                if len(groups[c]) >= group_size:
                    break
                if int(j) in unassigned:
                    groups[c].append(int(j))
                    unassigned.discard(int(j))
    return [groups[c] for c in sorted(groups)], sorted(unassigned)


def merge_weights(saliency: np.ndarray, group: list[int]) -> np.ndarray:
    """Normalised saliency of the group's members; an expert with zero saliency counts as the smallest
    positive saliency of the layer (at most 0.5), as in the REAM code, so it still contributes."""
    s = np.asarray(saliency, np.float64).copy()
    positive = s[s > 0]
    floor = min(0.5, float(positive.min())) if positive.size else 1.0
    s[s <= 0] = floor
    w = s[group]
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# Neuron alignment


def neuron_features(experts: dict) -> jax.Array:
    """Per-neuron weight vectors ``[E, I, 3D]``: ``[W_gate[:, p], W_up[:, p], W_down[p, :]]``."""
    gate = jnp.swapaxes(experts["gate_proj"]["kernel"], 1, 2).astype(jnp.float32)
    up = jnp.swapaxes(experts["up_proj"]["kernel"], 1, 2).astype(jnp.float32)
    down = experts["down_proj"]["kernel"].astype(jnp.float32)
    return jnp.concatenate([gate, up, down], axis=-1)


def _unit_rows(x: jax.Array) -> jax.Array:
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)


def pca_project(x: jax.Array, dim: int, seed: int = 0, oversample: int = 10, power_iterations: int = 2) -> jax.Array:
    """Centred ``x [n, f]`` projected on its top ``dim`` principal directions, scaled by the singular
    values (REAM's weight features). Exact SVD when small, else a randomized range finder."""
    x = x - jnp.mean(x, axis=0, keepdims=True)
    n, f = x.shape
    dim = min(dim, n, f)
    q = dim + oversample
    if min(n, f) <= q:
        _, s, vt = jnp.linalg.svd(x, full_matrices=False)
        return x @ (vt[:dim].T * s[:dim])
    basis = x @ jax.random.normal(jax.random.PRNGKey(seed), (f, q), x.dtype)
    for _ in range(power_iterations):
        basis, _ = jnp.linalg.qr(basis)
        basis, _ = jnp.linalg.qr(x @ (x.T @ basis))
    basis, _ = jnp.linalg.qr(basis)
    _, s, vt = jnp.linalg.svd(basis.T @ x, full_matrices=False)
    return x @ (vt[:dim].T * s[:dim])


def layer_weight_features(experts: dict, pca_dim: int, seed: int = 0) -> jax.Array:
    """Row-normalised PCA weight features of every neuron of the layer ``[E, I, r]`` (PCA fitted on all)."""
    features = _unit_rows(neuron_features(experts))
    e, i, f = features.shape
    projected = pca_project(features.reshape(e * i, f), pca_dim, seed)
    return _unit_rows(projected.reshape(e, i, -1))


def expert_activations(experts: dict, index: int, x: jax.Array) -> jax.Array:
    """Neuron activations ``silu(x W_gate) * x W_up`` of one expert on tokens ``x``: ``[Ns, I]``."""
    x = x.astype(jnp.float32)
    gate = x @ experts["gate_proj"]["kernel"][index].astype(jnp.float32)
    up = x @ experts["up_proj"]["kernel"][index].astype(jnp.float32)
    return jax.nn.silu(gate) * up


def _pairwise_distance(a: jax.Array, b: jax.Array) -> np.ndarray:
    sq = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * jnp.einsum(
        "pd,qd->pq", a, b, precision="highest")
    return np.sqrt(np.clip(np.asarray(sq, np.float64), 0.0, None))


def alignment_permutation(cost: np.ndarray) -> np.ndarray:
    """``perm[p]``: the member neuron matched to centroid neuron ``p`` (minimum total cost)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), np.int64)
    perm[rows] = cols
    return perm


def permute_expert(kernels: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """One expert's kernels (gate/up ``[D, I]``, down ``[I, D]``) with its neurons reordered by ``perm``;
    the expert computes exactly the same function."""
    return {"gate_proj": kernels["gate_proj"][:, perm], "up_proj": kernels["up_proj"][:, perm],
            "down_proj": kernels["down_proj"][perm, :]}


def merge_group(experts: dict, group: list[int], weights: np.ndarray, perms: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Weighted float32 average of the group's experts, members permuted onto the centroid ``group[0]``."""
    merged = None
    for index, weight, perm in zip(group, weights, [None] + list(perms), strict=True):
        kernels = {p: np.asarray(experts[p]["kernel"][index], np.float32) for p in _PROJ}
        if perm is not None:
            kernels = permute_expert(kernels, perm)
        scaled = {p: np.float32(weight) * k for p, k in kernels.items()}
        merged = scaled if merged is None else {p: merged[p] + scaled[p] for p in _PROJ}
    return merged


# ---------------------------------------------------------------------------------------------
# One layer


@dataclasses.dataclass
class LayerMerge:
    groups: list[list[int]]  # original indices, centroid first; the merged layer keeps one expert per group
    weights: list[list[float]]
    dropped: list[int]
    permutations: dict[int, list[int]]  # member -> perm onto its centroid (absent: not aligned)


def ream_layer(mlp: dict, config: MoeConfig, saliency: np.ndarray, distances: np.ndarray, x_sample: jax.Array | None,
               num_keep: int, options: ReamOptions) -> tuple[dict, LayerMerge]:
    """Merge one layer's experts down to ``num_keep``; returns the new MoE params and what was done."""
    del config  # same function for every family: the shared expert (if any) is left alone
    experts = mlp["experts"]
    groups, dropped = pseudo_group(saliency, distances, num_keep, options.group_size)
    use_act = options.alignment in ("activation+weight", "activation")
    use_wt = options.alignment in ("activation+weight", "weight")
    if use_act and x_sample is None:
        raise UsageError("activation alignment needs a token sample")
    needs_alignment = any(len(g) > 1 for g in groups) and (use_act or use_wt)
    features = layer_weight_features(experts, options.pca_dim, options.seed) if needs_alignment and use_wt else None

    merged_kernels: dict[int, dict[str, np.ndarray]] = {}
    weights_out, perms_out = [], {}
    for group in groups:
        weights = merge_weights(saliency, group)
        weights_out.append(weights.tolist())
        if len(group) == 1:
            continue
        perms = []
        if needs_alignment:
            centroid = group[0]
            act_c = _unit_rows(expert_activations(experts, centroid, x_sample).T) if use_act else None
            for member in group[1:]:
                cost = 0.0
                if use_act:
                    cost = cost + _pairwise_distance(act_c, _unit_rows(expert_activations(experts, member, x_sample).T))
                if use_wt:
                    cost = cost + _pairwise_distance(features[centroid], features[member])
                perm = alignment_permutation(cost)
                perms.append(perm)
                perms_out[member] = perm.tolist()
        else:
            i = experts["gate_proj"]["kernel"].shape[-1]
            perms = [np.arange(i)] * (len(group) - 1)
        merged_kernels[group[0]] = merge_group(experts, group, weights, perms)

    keep = [g[0] for g in groups]
    new_experts = {}
    for proj in _PROJ:
        stacked = experts[proj]["kernel"]
        slices = [jnp.asarray(merged_kernels[c][proj], stacked.dtype) if c in merged_kernels else stacked[c]
                  for c in keep]
        new_experts[proj] = {"kernel": jnp.stack(slices)}
    out = dict(mlp)
    out["gate"] = {name: jnp.take(value, jnp.asarray(keep), axis=-1) for name, value in mlp["gate"].items()}
    out["experts"] = new_experts
    return out, LayerMerge(groups=groups, weights=weights_out, dropped=dropped, permutations=perms_out)
