"""Capture pass 1 (distances of every candidate block and their normal equations, as ``compress``
runs it when the statistics fit in memory) at two depths, before and after issue 14, in one run.

"before" is ``replaceme_jax/capture.py`` as of commit ``BEFORE`` (the whole model in one jitted
step, the layer loop unrolled in the trace, float64 sums on the host after every batch), read with
``git show`` and imported beside the current module; "after" is the current module (one jitted step
per layer kind, device-resident float32 Kahan sums). Each (implementation, depth) runs in a fresh
process, so every compilation is cold; the runs alternate, ``--repeats`` times.

Reported per run: ``first`` = wall time of ``run_capture`` on one batch in a fresh process (compile
plus one batch, sums read on the host), ``per_batch`` = later batches (compiled), and the ratios
64-layer / 8-layer and before / after. The model is a random llama with no files
(``models.common.init_params`` over ``llama.param_specs``).

    PYTHONPATH=. python bench/capture_depth.py --depths 8,64 --hidden 64 --vocab 256 \\
        --out bench/results/capture_depth.json
    PYTHONPATH=. python bench/capture_depth.py --depths 30 --hidden 576 --intermediate 1536 --heads 9 \\
        --kv-heads 3 --vocab 49152 --batch 8 --length 256 --batches 4 --out bench/results/capture_smollm2.json
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "d2c258a"  # the last commit with the whole-model capture step


def load_before():
    source = subprocess.run(["git", "show", f"{BEFORE}:replaceme_jax/capture.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "capture_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("capture_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_model(args, layers: int):
    import jax
    from replaceme_jax.models import llama
    from replaceme_jax.models.common import init_params

    config = llama.LlamaConfig(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.intermediate or 2 * args.hidden, num_hidden_layers=layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                               head_dim=args.hidden // args.heads, rms_norm_eps=1e-5, rope_theta=10000.0)
    return init_params(llama.param_specs(config), jax.random.PRNGKey(0)), config


def batches(args, count: int, seed: int):
    import numpy as np
    from replaceme_jax.data.batching import Batch

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1, args.vocab, (args.batch, args.length)).astype(np.int32)
        mask = np.ones_like(ids)
        for row, length in enumerate(rng.integers(args.length // 2, args.length + 1, args.batch)):
            mask[row, length:] = 0
            ids[row, length:] = 0
        out.append(Batch(input_ids=ids, attention_mask=mask, n_real_rows=args.batch, rows=tuple(range(args.batch))))
    return out


def worker(args, impl: str, layers: int) -> dict:
    import jax
    import numpy as np

    if impl == "before":
        capture = load_before()
    else:
        from replaceme_jax import capture
    from replaceme_jax.replaceme.selection import candidate_starts

    params, config = make_model(args, layers)
    jax.block_until_ready(params)
    starts = candidate_starts(layers, args.n)
    spec = capture.CaptureSpec(distance_starts=tuple(starts), distance_n=args.n,
                               stats_blocks=tuple((s, s + args.n) for s in starts), rows=capture.RowPolicy())

    def run(bs):
        began = time.perf_counter()
        acc = capture.run_capture(params, config, spec, bs)
        distances = acc.distances()
        equations = acc.equations  # on the host, float64
        return time.perf_counter() - began, distances, equations

    first, distances, _ = run(batches(args, 1, 0))
    rest, _, equations = run(batches(args, args.batches, 1))
    return {"impl": impl, "layers": layers, "first_s": first, "per_batch_s": rest / args.batches,
            "distance_0": distances[starts[0]], "A_trace_0": float(np.trace(equations[0].A))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="8,64")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--n", type=int, default=2, help="layers_to_skip: blocks (s, s + n)")
    parser.add_argument("--batches", type=int, default=4, help="compiled batches timed after the first")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--impls", default="before,after")
    parser.add_argument("--out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, layers = args.worker.split(":")
        print("RESULT " + json.dumps(worker(args, impl, int(layers))), flush=True)
        return

    runs = []
    argv = [a for a in sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for repeat in range(args.repeats):
        for layers in [int(d) for d in args.depths.split(",")]:
            for impl in args.impls.split(","):
                proc = subprocess.run([sys.executable, __file__, *argv, "--worker", f"{impl}:{layers}"], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(proc.stderr[-3000:])
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
                runs.append(json.loads(line[len("RESULT "):]))
                print(json.dumps(runs[-1]), flush=True)

    def median(impl, layers, key):
        values = [r[key] for r in runs if r["impl"] == impl and r["layers"] == layers]
        return statistics.median(values) if values else None

    depths = [int(d) for d in args.depths.split(",")]
    summary = {}
    for impl in args.impls.split(","):
        for layers in depths:
            summary[f"{impl}_{layers}"] = {k: median(impl, layers, k) for k in ("first_s", "per_batch_s")}
        if len(depths) == 2:
            lo, hi = depths
            summary[f"{impl}_first_ratio_{hi}_over_{lo}"] = median(impl, hi, "first_s") / median(impl, lo, "first_s")
    if {"before", "after"} <= set(args.impls.split(",")):
        for layers in depths:
            for key in ("first_s", "per_batch_s"):
                summary[f"before_over_after_{key}_{layers}"] = median("before", layers, key) / median("after", layers, key)
            same = [(r["distance_0"], r["A_trace_0"]) for r in runs if r["layers"] == layers]
            summary[f"max_rel_diff_{layers}"] = max(abs(a - b) / max(abs(b), 1e-30)
                                                    for x in same for y in same for a, b in zip(x, y))
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary,
                                              "machine": platform.processor() or platform.machine(),
                                              "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
