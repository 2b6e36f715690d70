"""Screen remedies for the lstsq fit on SmolLM2 (block (11, 19), the issue-3 setting) on a cheap proxy:
WikiText-2 perplexity on the first 8 windows of 1024 tokens, LAMBADA and ARC-Easy on the first 200 items.

    python bench/screen_lstsq_variants.py --output bench/results/screen_lstsq.json

Row policies need one statistics pass each (block (11, 19) only); the solver variants reuse them.
"""

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.capture import CaptureSpec, RowPolicy, run_capture
from replaceme_jax.config import CompressConfig, from_dict
from replaceme_jax.evaluation import load_task, run_task
from replaceme_jax.replaceme import lstsq_from_normal_equations, replace_block
from replaceme_jax.data import calibration_batches

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BLOCK = (11, 19)

parser = argparse.ArgumentParser()
parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "screen_lstsq.json"))
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

cfg = from_dict(CompressConfig, dict(dataset=str(DATA / "calibration" / "c4_sample.jsonl"), dataset_size=256,
                                     max_length=512, batch_size=8, layers_to_skip=8))
model = load_model("smollm2-135m")
tokenizer = load_tokenizer(model)
batches = calibration_batches(cfg, tokenizer, model.params, model.config)
tasks = [load_task("wikitext2", DATA / "eval", 8), load_task("lambada_openai", DATA / "eval", 200),
         load_task("arc_easy", DATA / "eval", 200)]

policies = {"pad_free": RowPolicy(), "no_first_token": RowPolicy(exclude_first_token=True),
            "normalized": RowPolicy(normalize=True), "normalized_no_first": RowPolicy(normalize=True, exclude_first_token=True)}
solvers = {"plain": (0.0, "zero"), "ridge_I_0.01": (0.01, "identity"), "ridge_I_0.1": (0.1, "identity"),
           "ridge_I_1": (1.0, "identity")}


def evaluate(params, config):
    out = {}
    for task in tasks:
        m = run_task(params, config, tokenizer, task, max_length=1024, batch_size=16).metrics
        out[task.name] = m
    return out


results = {"uidl": evaluate(*replace_block(model.params, model.config, *BLOCK, None))}
logging.info("uidl %s", results["uidl"])
for pname, policy in policies.items():
    start = time.perf_counter()
    eq = run_capture(model.params, model.config, CaptureSpec(stats_blocks=(BLOCK,), rows=policy), batches).equations[0]
    logging.info("%s statistics in %.0f s", pname, time.perf_counter() - start)
    scale = float(np.mean(np.diag(eq.A)))
    for sname, (alpha, target) in solvers.items():
        if pname.startswith("normalized") and sname != "plain" and sname != "ridge_I_0.1":
            continue
        T, info = lstsq_from_normal_equations(eq.A, eq.B, alpha * scale, ridge_target=target)
        name = f"{pname}/{sname}"
        results[name] = dict(evaluate(*replace_block(model.params, model.config, *BLOCK, T)),
                             relative_error=eq.relative_error(T), max_abs_T=float(np.abs(T).max()))
        logging.info("%s %s", name, results[name])
        Path(args.output).write_text(json.dumps(results, indent=1))
for name, r in results.items():
    print(f"{name:34s} wiki8 {r['wikitext2']['perplexity']:9.1f}  lambada {r['lambada_openai']['acc']:.3f} / "
          f"{r['lambada_openai']['perplexity']:10.0f}  arc_e {r['arc_easy']['acc_norm']:.3f}")
