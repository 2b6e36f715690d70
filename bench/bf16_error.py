"""The bf16 path against float32 on the real SmolLM2-135M (issue 14): the same ``compress`` run with
``dtype: bfloat16`` (weights and activations in bf16; the statistics are summed in float32 on the
device either way) and with ``dtype: float32``, compared on

- the angular distances of every candidate block (max absolute difference),
- the fitted T (relative Frobenius difference) and its block,
- the WikiText-2 perplexity of both pruned models, each scored in float32 (the bf16 run's merged
  weights are cast up), and the held-out perplexity each run reported in its own dtype.

One fixed fit (no held-out search) so that only the dtype differs:

    PYTHONPATH=. python bench/bf16_error.py [--docs 32] [--max-length 256] [--n 8] [--windows 4] \\
        [--out bench/results/bf16_error.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import replaceme_jax as rj  # noqa: E402
from replaceme_jax.conversion import load_tokenizer  # noqa: E402
from replaceme_jax.evaluation import perplexity  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def c4_texts(count: int) -> list[str]:
    with open(DATA / "calibration" / "c4_sample.jsonl") as f:
        return [json.loads(line)["text"] for _, line in zip(range(count), f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 1024 tokens")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    texts = c4_texts(args.docs)
    wikitext = (DATA / "eval" / "wikitext2_test.raw").read_text()[: 6000 * args.windows]
    options = dict(layers_to_skip=args.n, max_length=args.max_length, batch_size=8, alpha=0.1, alpha_relative=True,
                   first_token_rows=1e-4)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        result = rj.compress(args.model, texts, dtype=dtype, **options)
        seconds = time.perf_counter() - start
        block = result.blocks[0]
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), result.model.params)
        tokenizer = load_tokenizer(result.model)
        with jax.default_matmul_precision("highest"):
            ppl = perplexity(params, result.model.config, tokenizer, wikitext, max_length=1024, limit=args.windows)
        runs[dtype] = {"seconds": seconds, "block": [block.start, block.end], "distances": result.distances,
                       "T": block.T, "wikitext2_perplexity_float32": ppl.metrics["perplexity"],
                       "heldout_perplexity_own_dtype": (block.validation or {}).get("perplexity_with_T")}
        print(dtype, runs[dtype]["block"], f"{seconds:.0f} s", "wikitext2", f"{ppl.metrics['perplexity']:.3f}",
              flush=True)
    f32, bf16 = runs["float32"], runs["bfloat16"]
    starts = sorted(set(f32["distances"]) & set(bf16["distances"]))
    both_T = f32["T"] is not None and bf16["T"] is not None and f32["block"] == bf16["block"]
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "settings": {**options, "docs": args.docs, "model": args.model, "windows": args.windows},
        "distance_max_abs_difference": max(abs(f32["distances"][s] - bf16["distances"][s]) for s in starts),
        "block_float32": f32["block"], "block_bfloat16": bf16["block"],
        "T_relative_difference": float(np.linalg.norm(bf16["T"] - f32["T"]) / np.linalg.norm(f32["T"]))
        if both_T else None,
        **{f"{k}_{d}": runs[d][k] for d in runs for k in ("wikitext2_perplexity_float32",
                                                          "heldout_perplexity_own_dtype", "seconds")},
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
