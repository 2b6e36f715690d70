"""Peak memory of `experts` against the number of calibration tokens (issue 14): the residual streams kept
in memory between layers (before) against spilled to a temporary directory (after), each run in its own
process, N and 4N tokens, all in one run.

    .venv/bin/python bench/experts_memory.py [--tokens 32768] [--factor 4] [--methods reap,ream]
                                             [--modes before,after,after-mmap] [--hidden 512]
                                             [--before-rev d2c258a] [--output bench/results/experts_memory.json]

The model: a random Qwen2-MoE (`hidden` wide, 2 layers, 8 experts of width 64, top-2, a 128-word
vocabulary; built with tests/helpers.py), so that the float32 residual streams (`tokens x hidden x 4`
bytes, twice: a layer's inputs and outputs) outweigh the model and the runtime. Calibration: documents
of random words, `max_length` 512, `dataset_size` = tokens / 512, `sample_tokens` 4096 (the token
sample is bounded by it, not by the data).

"before" is `replaceme_jax/experts/calibrate.py` as it was at `--before-rev` (read with `git show`,
loaded as a module and patched into the pipeline); "after" is the working tree's. Every other line of
code is the same in both. "after-mmap" is "after" with glibc's mmap threshold fixed at 1 MiB
(`MALLOC_MMAP_THRESHOLD_=1048576`: every buffer of a batch is its own mapping, returned on free, instead
of the heap that glibc's dynamic threshold moves it to, where it fragments). Each worker reports its
peak RSS (VmHWM; not `ru_maxrss`, which Linux carries over from the parent through fork and exec), the
peak after each pipeline stage, its wall time, and a digest of the result (kept experts, groups,
saliencies and reconstruction errors per layer), which must be equal in every mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_LENGTH = 512


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(root: Path, hidden: int, documents: int) -> None:
    import numpy as np

    from tests.helpers import WORDS
    from tests.moe_helpers import make_moe_model

    make_moe_model(root / "model", "qwen2_moe", tokenizer=True, hidden_size=hidden, num_attention_heads=8,
                   num_key_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                   num_experts=8, num_experts_per_tok=2, max_position_embeddings=MAX_LENGTH + 16)
    rng = np.random.default_rng(0)
    with open(root / "calib.jsonl", "w") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, MAX_LENGTH + 64))}) + "\n")


def worker(args) -> None:
    import jax

    from replaceme_jax.config import load_config
    from replaceme_jax.experts import pipeline
    from replaceme_jax.experts.config import ExpertsConfig

    if args.mode == "before":
        source = subprocess.run(["git", "show", f"{args.before_rev}:replaceme_jax/experts/calibrate.py"], cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout
        module = types.ModuleType("calibrate_before")
        exec(compile(source, f"calibrate.py@{args.before_rev}", "exec"), module.__dict__)

        class Before(module.LayerwiseCalibration):
            def close(self):  # the old class held everything in memory: nothing to delete
                pass

        pipeline.LayerwiseCalibration = Before
    keys = dict(model_path=str(args.root / "model"), dataset=str(args.root / "calib.jsonl"),
                dataset_size=args.tokens // MAX_LENGTH, max_length=MAX_LENGTH, batch_size=8, method=args.method,
                num_experts=4, sample_tokens=4096, save_path=str(args.root / f"out-{args.mode}-{args.method}"),
                overwrite=True)
    cfg = load_config(ExpertsConfig, None, [f"{k}={v}" for k, v in keys.items()])
    start = time.perf_counter()
    result = pipeline.compress_experts(cfg)
    seconds = time.perf_counter() - start
    layers = [{k: e.get(k) for k in ("saliency", "kept", "groups", "weights")} for e in result.recipe["layers"]]
    errors = [e.get("reconstruction_error") for e in result.report["layers"]]
    digest = hashlib.sha256(json.dumps([layers, errors], sort_keys=True).encode()).hexdigest()[:16]
    print(json.dumps({"mode": args.mode, "method": args.method, "tokens": result.report["calibration_tokens"],
                      "peak_rss_bytes": peak_rss_bytes(), "seconds": seconds, "digest": digest,
                      "reconstruction_error": errors, "jax": jax.__version__,
                      "peak_rss_mb_after_stage": {k: round(v, 1) for k, v in
                                                  result.report["peak_rss_mb_after_stage"].items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="N: calibration tokens of the small run")
    parser.add_argument("--factor", type=int, default=4, help="the large run has factor x N tokens")
    parser.add_argument("--methods", default="reap,ream", help="reap: non-sequential; ream: sequential")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--before-rev", default="d2c258a", help="the commit whose calibrate.py is 'before'")
    parser.add_argument("--modes", default="before,after,after-mmap")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "experts_memory.json")
    parser.add_argument("--worker", dest="mode", choices=("before", "after", "after-mmap"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return worker(args)

    sizes = [args.tokens, args.factor * args.tokens]
    runs = []
    with tempfile.TemporaryDirectory(prefix="experts-memory-") as tmp:
        root = Path(tmp)
        build(root, args.hidden, max(sizes) // MAX_LENGTH)
        for method in args.methods.split(","):
            for tokens in sizes:
                for mode in args.modes.split(","):  # interleaved: they share the machine's load alike
                    command = [sys.executable, __file__, "--worker", mode, "--root", str(root), "--method", method,
                               "--tokens", str(tokens), "--before-rev", args.before_rev]
                    env = dict(os.environ, JAX_PLATFORMS="cpu")
                    if mode == "after-mmap":
                        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
                    proc = subprocess.run(command, capture_output=True, text=True, env=env)
                    if proc.returncode:
                        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
                    run = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs.append(run)
                    print(f"{method} {mode:6s} {run['tokens']:7d} tokens: peak RSS "
                          f"{run['peak_rss_bytes'] / 2**20:7.1f} MiB, {run['seconds']:6.1f} s, digest {run['digest']}; "
                          f"peak RSS (MiB) after each stage: {run['peak_rss_mb_after_stage']}", flush=True)
    summary = {}
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            small, large = (next(r for r in runs if (r["method"], r["mode"]) == (method, mode) and
                                 r["tokens"] == args.tokens * k) for k in (1, args.factor))
            summary[f"{method} {mode}"] = {"rss_ratio": large["peak_rss_bytes"] / small["peak_rss_bytes"],
                                           "seconds_ratio": large["seconds"] / small["seconds"]}
        for tokens in sizes:
            digests = {r["digest"] for r in runs if r["method"] == method and r["tokens"] == tokens}
            summary[f"{method} {tokens} identical before/after"] = len(digests) == 1
    for key, value in summary.items():
        print(key, value)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"tokens": sizes, "hidden": args.hidden, "max_length": MAX_LENGTH, "sample_tokens": 4096,
                     "before_rev": args.before_rev},
        "runs": runs, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
