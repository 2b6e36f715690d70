"""Fold T into the MLP branch of the last kept layer (each family's ``fold_output_map``) and drop the
block. No new parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.models import family_for
from replaceme_jax.sharding import gather_to_host


def _sharding_preserving_rewrite(value, fn):
    """``fn`` of the parameter in float64 on host, cast back; a sharded parameter keeps its layout, so
    later passes run on the same mesh."""
    merged = np.asarray(fn(np.asarray(gather_to_host(value), np.float64))).astype(value.dtype)
    sharding = getattr(value, "sharding", None)
    if sharding is None:
        return jnp.asarray(merged)
    return jax.make_array_from_callback(merged.shape, sharding, lambda index: merged[index])


def fold_transform(down_proj: dict, T: np.ndarray) -> dict:
    """kernel' = kernel @ T, bias' = bias @ T (Flax layout [I, D]), computed in float64."""
    T = np.asarray(T, np.float64)
    return {name: _sharding_preserving_rewrite(value, lambda a: a @ T) for name, value in down_proj.items()}


def replace_block(params: dict, config, start: int, end: int, T: np.ndarray | None):
    """Remove layers ``start .. end-1`` (current numbering); fold ``T`` into layer ``start-1``.

    ``T=None`` drops the block only (UIDL). Returns new ``(params, config)``; the inputs are unchanged.
    """
    if not 1 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"invalid block ({start}, {end}) for {config.num_hidden_layers} layers")
    layers = list(params["layers"])
    if T is not None:
        layers[start - 1] = family_for(config.model_type).fold_output_map(layers[start - 1], config, T,
                                                                          rewrite=_sharding_preserving_rewrite)
    kept = [i for i in range(config.num_hidden_layers) if not start <= i < end]
    new_params = dict(params)
    new_params["layers"] = layers[:start] + layers[end:]
    return new_params, config.with_layers(kept)
