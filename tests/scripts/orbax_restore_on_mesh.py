"""Restore an orbax checkpoint of this tool onto a mesh; print each parameter's sharding, the shape of
its first addressable shard and its values' checksum (JSON, tag RESULT).

argv[1]: JSON list of checkpoints (any format load_model takes); argv[2]: JSON mesh {axis: size}. Run with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts.
"""

import json
import sys

import numpy as np

from replaceme_jax.conversion import load_model
from replaceme_jax.conversion.weight_map import flatten_params
from replaceme_jax.sharding import make_mesh, place_fn

mesh = make_mesh(json.loads(sys.argv[2]))
result = {}
for source in json.loads(sys.argv[1]):
    model = load_model(source, place=place_fn(mesh))
    result[source] = {path: {"spec": [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec],
                             "mesh": dict(leaf.sharding.mesh.shape),
                             "shard": list(leaf.addressable_shards[0].data.shape),
                             "sum": float(np.asarray(leaf, np.float64).sum())}
                      for path, leaf in flatten_params(model.params).items()}
print("RESULT " + json.dumps(result))
