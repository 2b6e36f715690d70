"""MoE expert compression: routed-token statistics, pruning (frequency, EAN, REAP) and REAM merging.

Plain functions over the params pytree of ``replaceme_jax.models.moe``; nothing here knows a file
format. Definitions are in ``docs/MOE.md``.
"""

from replaceme_jax.experts.calibrate import LayerwiseCalibration, collect_statistics
from replaceme_jax.experts.merge import ReamOptions, expert_distances, pseudo_group, ream_layer, sample_statistics
from replaceme_jax.experts.prune import num_experts_to_keep, prune, prune_mlp, select_experts
from replaceme_jax.experts.stats import ExpertStats, init_stats, saliency, update_stats

__all__ = [
    "ExpertStats", "LayerwiseCalibration", "ReamOptions", "collect_statistics", "expert_distances", "init_stats",
    "num_experts_to_keep", "prune", "prune_mlp", "pseudo_group", "ream_layer", "saliency", "sample_statistics",
    "select_experts", "update_stats",
]
