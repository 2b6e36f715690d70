"""Peak memory and step time of `refine: kl` on the real SmolLM2-135M, in a fresh process per run.

    .venv/bin/python bench/refine_memory.py [--block 12,16] [--documents 32] [--batches 4] [--steps 4]
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/refine_memory.py ...   # another version

Calibration: the first ``--documents`` C4 documents of ../shared/data (max_length 512, batches of 8, as
the issue-16 benchmark), the first ``--batches`` batches of them. The process loads the model, runs
`refine_kl` for block ``--block`` from T = I for ``--steps`` steps, and prints one JSON object: the
peak RSS (``ru_maxrss``) after loading and after refining, the time to the end of the first step (the
teacher's pass over the batches, compiling, the step) and the mean of the others, and which checkout's
`replaceme_jax` ran (so that two versions can be compared with PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C4 = ROOT.parent / "shared" / "data" / "calibration" / "c4_sample.jsonl"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="12,16")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=None, help="positions per logits chunk (default: the library's)")
    args = parser.parse_args()

    import replaceme_jax
    from replaceme_jax.conversion import load_model, load_tokenizer
    from replaceme_jax.data import load_calibration, make_batches
    from replaceme_jax.replaceme import refine

    if args.chunk is not None:
        refine.TOKEN_CHUNK = args.chunk

    code = Path(replaceme_jax.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(code), "status", "--porcelain", "replaceme_jax"],
                                capture_output=True, text=True).stdout.strip())
    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer(model)
    sequences = load_calibration(str(C4), tokenizer, 512, size=args.documents, column="text")
    batches = list(make_batches(sequences, 8, 512, tokenizer.pad_token_id or 0))[: args.batches]
    rss_loaded = peak_rss_mb()

    start, end = (int(x) for x in args.block.split(","))
    step_times = []
    last = time.perf_counter()

    original_step = refine._step

    def timed_step(*a, **k):  # refine_kl times only the whole; each step is timed here
        nonlocal last
        out = original_step(*a, **k)
        out[2].block_until_ready()
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        return out

    refine._step = timed_step
    began = time.perf_counter()
    result = refine.refine_kl(model.params, model.config, model.params, model.config, start, end, None, batches,
                              steps=args.steps, lr=1e-3, top_k=64, progress=False)
    print(json.dumps({
        "code": str(code), "commit": commit, "replaceme_jax_modified": dirty,
        "token_chunk": getattr(refine, "TOKEN_CHUNK", None), "block": [start, end], "batches": len(batches),
        "batch_shapes": sorted({tuple(b.input_ids.shape) for b in batches}), "tokens": result.tokens,
        "steps": args.steps, "peak_rss_mb_loaded": round(rss_loaded), "peak_rss_mb_refined": round(peak_rss_mb()),
        "refine_seconds": round(time.perf_counter() - began, 1),
        "teacher_and_first_step_s": round(step_times[0], 2) if step_times else None,
        "later_step_s": round(sum(step_times[1:]) / max(len(step_times) - 1, 1), 2),
        "kl": [round(x, 4) for x in result.losses], "machine": f"{platform.machine()}, {platform.processor() or ''}",
        "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
