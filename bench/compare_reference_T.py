"""Compare a fitted T with the reference implementation's (shared/data/reference/smollm2_n8_lstsq_T.safetensors).

    python bench/compare_reference_T.py outputs/smollm2-c4-lstsq-refmode/replaceme/transforms.safetensors
"""

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "smollm2_n8_lstsq_T.safetensors"

ours = load_file(sys.argv[1])
key = sys.argv[2] if len(sys.argv) > 2 else "block_11_19"
T, ref = ours[key], load_file(str(REFERENCE))["T"]
print(f"max abs difference {np.abs(T - ref).max():.3g} (max |T_ref| {np.abs(ref).max():.3g}); "
      f"relative Frobenius difference {np.linalg.norm(T - ref) / np.linalg.norm(ref):.3g}")
