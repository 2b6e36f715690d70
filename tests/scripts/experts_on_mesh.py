"""Run the experts command for each config of a JSON list; print what each kept and measured (JSON).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts.
"""

import json
import sys

import jax

from replaceme_jax.config import from_dict
from replaceme_jax.experts.config import ExpertsConfig
from replaceme_jax.experts.pipeline import compress_experts

out = []
for raw in json.loads(sys.argv[1]):
    result = compress_experts(from_dict(ExpertsConfig, raw))
    out.append({"mesh": result.report["platform"]["mesh"], "devices": jax.device_count(),
                "layers": result.report["layers"], "saliency": [e["saliency"] for e in result.recipe["layers"]]})
print("RESULT " + json.dumps(out))
