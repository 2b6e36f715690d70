"""Shard a tiny llama's parameters on a mesh; print the warnings logged, the resulting specs, the
mesh's device order and axis types, and the strict-rules error (JSON).

argv[1]: JSON {"mesh": {...}, "config": {LlamaConfig overrides}}. Run with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts.
"""

import json
import logging
import sys

import jax

from replaceme_jax.errors import UsageError
from replaceme_jax.models.common import init_params
from replaceme_jax.models.llama import LlamaConfig, param_specs
from replaceme_jax.sharding import MESH_AXES, ShardingRules, make_mesh, mesh_shape, shard_params

records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append({"level": record.levelname, "message": record.getMessage()})


logging.getLogger("replaceme_jax").addHandler(Keep())
args = json.loads(sys.argv[1])
config = LlamaConfig(**dict(dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 rms_norm_eps=1e-5, rope_theta=1e4), **args["config"]))
specs = param_specs(config)
params = init_params(specs, jax.random.PRNGKey(0))
mesh = make_mesh(args["mesh"])
sharded = shard_params(params, specs, mesh)
topology = jax.make_mesh(tuple(mesh_shape(args["mesh"], jax.device_count())[a] for a in MESH_AXES), MESH_AXES)
out = {"records": records,
       "specs": {path: list(leaf.sharding.spec) for path, leaf in (
           (jax.tree_util.keystr(p, simple=True, separator="."), x)
           for p, x in jax.tree_util.tree_flatten_with_path(sharded)[0])},
       "device_order": [d.id for d in mesh.devices.flat], "make_mesh_order": [d.id for d in topology.devices.flat],
       "axis_types": [t.name for t in mesh.axis_types]}
try:
    shard_params(params, specs, mesh, ShardingRules(strict=True))
    out["strict"] = None
except UsageError as e:
    out["strict"] = str(e)
print("RESULT " + json.dumps(out))
