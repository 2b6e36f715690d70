"""float32 matmuls at the capture pass's SmolLM2 shapes (8 x 512 tokens, hidden 576, MLP 1536): jitted
JAX against torch on this CPU, in GFLOP/s. A first look at issue 14's FLOP/s gap: if the raw matmuls
were the gap, they would show it here.

    .venv/bin/python bench/matmul_cpu.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(4096, 576, 1536), (4096, 1536, 576), (4096, 576, 576), (576, 4096, 576)]  # up, down, q/o, A = M^T M


def seconds_per_call(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out) if isinstance(out, jax.Array) else None
    return (time.perf_counter() - start) / repeats


def main():
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for m, k, n in SHAPES:
        a = np.random.default_rng(0).standard_normal((m, k), np.float32)
        b = np.random.default_rng(1).standard_normal((k, n), np.float32)
        flops = 2 * m * k * n
        ours = seconds_per_call(jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b), repeats=args.repeats)
        theirs = seconds_per_call(torch.matmul, torch.from_numpy(a), torch.from_numpy(b), repeats=args.repeats)
        rows.append({"shape": [m, k, n], "jax_gflops": round(flops / ours / 1e9, 1),
                     "torch_gflops": round(flops / theirs / 1e9, 1)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
