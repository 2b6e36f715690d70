"""Expert pruning: keep the most salient experts of each layer, slice the stacked kernels and the
router. No other weight changes, so the pruned model equals the original with the removed experts'
router logits at -inf."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from replaceme_jax.errors import UsageError
from replaceme_jax.models.common import Params
from replaceme_jax.models.moe import MoeConfig


def num_experts_to_keep(config: MoeConfig, num_experts: int | None = None,
                        compression_ratio: float | None = None) -> int:
    """Experts kept per layer: ``num_experts``, or ``N - int(N * compression_ratio)`` (MOE.md).

    Refuses a count below ``num_experts_per_tok`` (the router could not pick its k experts).
    """
    n = config.num_experts
    if (num_experts is None) == (compression_ratio is None):
        raise UsageError("give exactly one of num_experts and compression_ratio")
    if compression_ratio is not None:
        if not 0 <= compression_ratio < 1:
            raise UsageError(f"compression_ratio must be in [0, 1) (got {compression_ratio})")
        keep = n - int(n * compression_ratio)
    else:
        keep = int(num_experts)
    if keep > n:
        raise UsageError(f"cannot keep {keep} experts per layer: the model has {n}")
    if keep < config.num_experts_per_tok:
        raise UsageError(f"cannot keep {keep} experts per layer: fewer than num_experts_per_tok="
                         f"{config.num_experts_per_tok}")
    return keep


def rank_experts(saliency: np.ndarray) -> np.ndarray:
    """Expert indices from most to least salient; ties go to the lower index."""
    saliency = np.asarray(saliency, np.float64)
    return np.lexsort((np.arange(len(saliency)), -saliency))


def select_experts(saliency: np.ndarray, num_keep: int) -> np.ndarray:
    """The ``num_keep`` most salient experts, in their original order."""
    return np.sort(rank_experts(saliency)[:num_keep])


def prune_mlp(mlp: dict, keep: np.ndarray) -> dict:
    """One layer's MoE params with only the experts ``keep`` (router columns and expert slices)."""
    keep = jnp.asarray(np.asarray(keep, np.int32))
    out = dict(mlp)
    out["gate"] = {name: jnp.take(value, keep, axis=-1) for name, value in mlp["gate"].items()}
    out["experts"] = {proj: {"kernel": jnp.take(p["kernel"], keep, axis=0)} for proj, p in mlp["experts"].items()}
    return out


def apply_layer_params(params: Params, config: MoeConfig, mlps: list[dict]) -> tuple[Params, MoeConfig]:
    """Params with every layer's MoE replaced, and the config with the new expert count."""
    counts = {int(m["gate"]["kernel"].shape[-1]) for m in mlps}
    if len(counts) != 1:
        raise UsageError(f"every layer must keep the same number of experts (got {sorted(counts)})")
    layers = [dict(layer, mlp=mlp) for layer, mlp in zip(params["layers"], mlps, strict=True)]
    return dict(params, layers=layers), dataclasses.replace(config, num_experts=counts.pop())


def prune(params: Params, config: MoeConfig, keep_per_layer: list[np.ndarray]) -> tuple[Params, MoeConfig]:
    """Keep ``keep_per_layer[l]`` (original indices) in layer ``l``."""
    mlps = [prune_mlp(layer["mlp"], keep) for layer, keep in zip(params["layers"], keep_per_layer, strict=True)]
    return apply_layer_params(params, config, mlps)
