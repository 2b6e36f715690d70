"""Pieces shared by the decoder families: parameter declarations, norms, rotary embeddings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape and the logical name of each axis.

    Logical axes let a sharding table map e.g. ``"mlp"`` to a mesh axis without touching the model.
    """

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" | "ones" | "zeros"

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"shape {self.shape} and axes {self.logical_axes} differ in rank")


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs) -> Any:
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def init_params(specs, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters with the declared shapes (for tests and benchmarks of real shapes)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


# A value of a family's ``config_to_hf_updates``: remove this key from the exported config.json.
DROP_FIELD = type("DropField", (), {"__repr__": lambda self: "DROP_FIELD"})()



@dataclasses.dataclass(frozen=True)
class IfPresent:
    """A value of a family's ``config_to_hf_updates`` written only over a key the source config has."""

    value: Any


# (array, f) -> f(array as float64 on host), cast back to the array's dtype: how a fold rewrites a weight.
# Merging passes one that keeps a sharded array's layout; ``host_rewrite`` is the plain one.
HostRewrite = Callable[[Any, Callable[[np.ndarray], np.ndarray]], Any]


def host_rewrite(value, fn: Callable[[np.ndarray], np.ndarray]):
    return jnp.asarray(np.asarray(fn(np.asarray(value, np.float64))).astype(value.dtype))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    # Same order of operations as transformers: normalise in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(head_dim: int, theta: float, rope_type: str, params: dict) -> np.ndarray:
    """Inverse frequencies as transformers computes them, in float64 then float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / float(params["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, head_dim] in float32 (rotate-half layout, as in transformers)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, H, hd]; cos/sin: [B, S, hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
