"""ReplaceMe depth pruning: block selection, solvers for T, merge. Functions on arrays and pytrees."""

from replaceme_jax.replaceme.merge import fold_transform, replace_block
from replaceme_jax.replaceme.selection import candidate_starts, select_blocks
from replaceme_jax.replaceme.solvers import (
    NormalEquations,
    fit_cosine,
    lstsq_from_normal_equations,
    lstsq_transform,
)

__all__ = [
    "NormalEquations", "candidate_starts", "fit_cosine", "fold_transform", "lstsq_from_normal_equations",
    "lstsq_transform", "replace_block", "select_blocks",
]
