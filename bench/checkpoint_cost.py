"""Time of one orbax save of a pass-1-sized streaming state (what `checkpoint_every: auto` pays).

    .venv/bin/python bench/checkpoint_cost.py [--blocks 22] [--dim 576]

The state mirrors SmolLM2-135M's pass 1 at n = 8: per candidate block, A and B for fit/held-out x
ordinary/first-position rows, float64. Prints each save's seconds and the resulting bound on the
share of a pass spent saving under the auto policy (checkpointing.AUTO_MIN_INTERVAL_S, AUTO_COST_RATIO).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from replaceme_jax.checkpointing import AUTO_COST_RATIO, AUTO_MIN_INTERVAL_S, PassState


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=22)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--saves", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    state = {f"sum_{i}": rng.standard_normal((args.blocks, args.dim, args.dim)) for i in range(8)}
    mib = sum(v.nbytes for v in state.values()) / 2**20
    with tempfile.TemporaryDirectory() as d:
        passes = PassState(Path(d) / "pass", every=1)
        worst = 0.0
        for step in range(1, args.saves + 1):
            began = time.perf_counter()
            passes.save(step, state, force=True)
            seconds = time.perf_counter() - began
            worst = max(worst, seconds)
            print(f"save {step}: {mib:.0f} MiB in {seconds:.2f} s")
        passes.close()
    interval = max(AUTO_MIN_INTERVAL_S, AUTO_COST_RATIO * worst)
    print(f"auto policy: a save at most every {interval:.0f} s -> at most {worst / (interval + worst):.1%} of a pass")


if __name__ == "__main__":
    main()
