"""Flax NNX face of a converted checkpoint.

``CausalLM`` is an ``nnx.Module`` whose variables are the model's parameters in HF layout
(``embed_tokens``, ``layers[i]``, ``norm``, ``lm_head``), each an ``nnx.Param`` that carries its
logical axes (``vocab``, ``embed``, ``q_heads``, ``mlp``, ...) as Flax sharding metadata. So
``nnx.state(module)`` is the HF-layout tree, and Flax's logical-axis rules turn it into partition
specs (``partition_specs``/``shard``). The computation stays in the pure family functions
(``replaceme_jax.models``), jitted over the plain parameter tree: the module is what a Flax user
holds, not a second implementation.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

from replaceme_jax.conversion.model_io import LoadedModel
from replaceme_jax.models import family_for
from replaceme_jax.models.common import is_spec
from replaceme_jax.sharding import DEFAULT_RULES


class _Static:
    """Non-array attributes (config, source metadata) kept out of the state; compared by identity so
    that a module's graph definition stays hashable for ``nnx.jit``."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"Static({self.value!r})"


def _wrap(value, spec):
    if isinstance(value, Mapping):
        return nnx.Dict({k: _wrap(v, spec[k]) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return nnx.List([_wrap(v, s) for v, s in zip(value, spec)])
    # eager_sharding=False: the axes are metadata until the user shards under a mesh and rules.
    return nnx.Param(value, out_sharding=tuple(spec.logical_axes), eager_sharding=False)


def _unwrap(node):
    if isinstance(node, nnx.Dict):
        return {k: _unwrap(v) for k, v in node.items()}
    if isinstance(node, nnx.List):
        return [_unwrap(v) for v in node]
    if isinstance(node, nnx.Variable):
        return node.get_value()
    raise TypeError(f"unexpected node {type(node).__name__} in a CausalLM")


@functools.partial(jax.jit, static_argnames=("family", "config"))
def _logits(params, input_ids, attention_mask, *, family, config):
    return family.forward(params, config, input_ids, attention_mask).logits


class CausalLM(nnx.Module):
    """A decoder-only language model of any supported family, parameters in HF layout.

    >>> model = replaceme_jax.from_pretrained("smollm2-135m")
    >>> logits = model(input_ids, attention_mask)         # [B, S, V]
    >>> tree = model.params()                             # plain pytree for the pure functions
    """

    def __init__(self, config, params: Mapping, *, hf_config: dict | None = None, source: str = "<memory>",
                 source_format: str = "memory", source_dtype: str | None = None,
                 tokenizer_source: str | None = None):
        family = family_for(config.model_type)
        specs = family.param_specs(config)
        missing = set(specs) - set(params)
        if missing:
            raise ValueError(f"params lack {sorted(missing)} for model_type {config.model_type!r}")
        self._meta = _Static({"config": config, "hf_config": dict(hf_config or {}), "source": source,
                              "source_format": source_format, "tokenizer_source": tokenizer_source,
                              "source_dtype": source_dtype or str(jnp.asarray(
                                  jax.tree.leaves(params)[0]).dtype)})
        self._names = tuple(params)
        for name in self._names:
            setattr(self, name, _wrap(params[name], specs[name]))

    # -- views ----------------------------------------------------------------------------------
    @property
    def config(self):
        return self._meta.value["config"]

    @property
    def family(self):
        return family_for(self.config.model_type)

    @property
    def tokenizer_source(self) -> str | None:
        return self._meta.value["tokenizer_source"]

    def params(self) -> dict:
        """The parameters as a plain HF-layout pytree (``layers`` a list), for the pure functions."""
        return {name: _unwrap(getattr(self, name)) for name in self._names}

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, S, V]``; ``attention_mask`` marks real tokens (right padding)."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return _logits(self.params(), input_ids, jnp.asarray(attention_mask), family=self.family, config=self.config)

    # -- conversion -----------------------------------------------------------------------------
    @classmethod
    def from_loaded(cls, model: LoadedModel) -> "CausalLM":
        return cls(model.config, model.params, hf_config=model.hf_config, source=model.source,
                   source_format=model.source_format, source_dtype=model.source_dtype,
                   tokenizer_source=model.tokenizer_source)

    def to_loaded(self) -> LoadedModel:
        meta = self._meta.value
        params = self.params()
        return LoadedModel(config=self.config, params=params, hf_config=meta["hf_config"], source=meta["source"],
                           source_format=meta["source_format"],
                           dtype=str(jnp.asarray(jax.tree.leaves(params)[0]).dtype),
                           source_dtype=meta["source_dtype"], tokenizer_source=meta["tokenizer_source"])

    # -- sharding -------------------------------------------------------------------------------
    def partition_specs(self, rules: Mapping[str, str | None] | None = None):
        """``nnx.State`` of ``PartitionSpec``s from the parameters' logical axes under ``rules``
        (logical axis -> mesh axis; default ``sharding.DEFAULT_RULES``)."""
        rules = DEFAULT_RULES if rules is None else rules
        with spmd.logical_axis_rules(tuple(rules.items())):
            return nnx.get_partition_spec(nnx.state(self, nnx.Param))

    def shard(self, mesh: jax.sharding.Mesh, rules: Mapping[str, str | None] | None = None) -> "CausalLM":
        """Place every parameter on ``mesh`` by its logical axes (in place); returns ``self``.
        A logical axis mapped to a mesh axis that does not divide it is replicated instead."""
        state = nnx.state(self, nnx.Param)
        specs = self.partition_specs(rules)

        def placed(variable, spec):
            value = variable.get_value()
            axes = tuple(a if a is not None and value.shape[i] % _axis_size(mesh, a) == 0 else None
                         for i, a in enumerate(spec.get_value()))
            return variable.replace(jax.device_put(value, jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(*axes))))

        nnx.update(self, jax.tree.map(placed, state, specs, is_leaf=lambda x: isinstance(x, nnx.Variable)))
        return self


def _axis_size(mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def abstract_params(config) -> dict:
    """``jax.ShapeDtypeStruct`` tree of a family's parameters (float32), e.g. for planning memory."""
    specs = family_for(config.model_type).param_specs(config)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs, is_leaf=is_spec)


__all__ = ["CausalLM", "abstract_params"]
