"""Fold T into the MLP down-projection of the last kept layer and drop the block. No new parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.sharding import gather_to_host


def fold_transform(down_proj: dict, T: np.ndarray) -> dict:
    """kernel' = kernel @ T, bias' = bias @ T (Flax layout [I, D]), computed in float64."""
    T = np.asarray(T, np.float64)
    out = {}
    for name, value in down_proj.items():
        dtype = value.dtype
        merged = (np.asarray(gather_to_host(value), np.float64) @ T).astype(dtype)
        sharding = getattr(value, "sharding", None)
        if sharding is None:
            out[name] = jnp.asarray(merged)
        else:  # keep the layout of a sharded parameter, so later passes run on the same mesh
            out[name] = jax.make_array_from_callback(merged.shape, sharding, lambda index: merged[index])
    return out


def replace_block(params: dict, config, start: int, end: int, T: np.ndarray | None):
    """Remove layers ``start .. end-1`` (current numbering); fold ``T`` into layer ``start-1``.

    ``T=None`` drops the block only (UIDL). Returns new ``(params, config)``; the inputs are unchanged.
    """
    if not 1 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"invalid block ({start}, {end}) for {config.num_hidden_layers} layers")
    layers = list(params["layers"])
    if T is not None:
        last = dict(layers[start - 1])
        last["mlp"] = dict(last["mlp"])
        last["mlp"]["down_proj"] = fold_transform(last["mlp"]["down_proj"], T)
        layers[start - 1] = last
    kept = [i for i in range(config.num_hidden_layers) if not start <= i < end]
    new_params = dict(params)
    new_params["layers"] = layers[:start] + layers[end:]
    return new_params, config.with_layers(kept)
