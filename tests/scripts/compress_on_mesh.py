"""Run compress on a tiny model for a config (or a JSON list of configs, one after another in this process);
print each run's distances, blocks and T as JSON (on process 0).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts.
"""

import json
import sys

import numpy as np

from replaceme_jax.config import CompressConfig, from_dict
from replaceme_jax.replaceme.pipeline import compress

raw = json.loads(sys.argv[1])
for config in raw if isinstance(raw, list) else [raw]:
    result = compress(from_dict(CompressConfig, config))
    import jax  # noqa: E402  (after compress, which may have started jax.distributed)

    if jax.process_index() == 0:
        out = {"distances": {str(k): v for k, v in result.distances.items()}, "blocks": result.report["blocks"],
               "T": [np.asarray(b.T).tolist() if b.T is not None else None for b in result.blocks],
               "devices": jax.device_count(), "processes": jax.process_count(),
               "mesh": result.report["platform"]["mesh"]}
        print("RESULT " + json.dumps(out), flush=True)
