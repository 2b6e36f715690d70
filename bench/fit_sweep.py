"""Sweep the first-position row weight and the ridge of the lstsq fit on one calibration setting.

For every (w, alpha) the T is solved from the same sums; reported: held-out perplexity (the
documents the fit never saw), held-out relative errors of ordinary and first-position rows, and
WikiText-2 perplexity on the first ``--windows`` windows of 1024 tokens. ``w`` weights the
first-position rows so that their energy is ``w`` times the other rows' (``w = 0``: excluded; the
plain "include" fit is ``w = tr(A_first) / tr(A_rest)``); ``alpha`` is relative to ``mean(diag(A_rest))``,
with the ridge towards the identity.

    PYTHONPATH=. python bench/fit_sweep.py --dataset ../shared/data/calibration/c4_sample.jsonl \
        --size 16 --max-length 128 --n 8 --out bench/results/fit_sweep_c4_16.json
"""
import argparse
import json
import time

import numpy as np

from replaceme_jax.capture import CaptureSpec, RowPolicy, run_capture
from replaceme_jax.config import CompressConfig, from_dict
from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.data import batches_for, calibration_sequences, split_heldout
from replaceme_jax.evaluation import load_task, run_task
from replaceme_jax.replaceme.merge import replace_block
from replaceme_jax.replaceme.selection import candidate_starts
from replaceme_jax.replaceme.solvers import lstsq_from_normal_equations
from replaceme_jax.replaceme.validation import perplexity, sequence_nll

p = argparse.ArgumentParser()
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--dataset", default="self")
p.add_argument("--size", type=int, default=16)
p.add_argument("--max-length", type=int, default=128)
p.add_argument("--n", type=int, default=8)
p.add_argument("--block", type=int, nargs=2, default=None, help="default: the distance-chosen block")
p.add_argument("--windows", type=int, default=4)
p.add_argument("--weights", default="0,1e-3,1e-2,1e-1,1,include")
p.add_argument("--alphas", default="0,1e-2,1e-1,1,10")
p.add_argument("--out", default=None)
args = p.parse_args()

cfg = from_dict(CompressConfig, {"model_path": args.model, "save_path": None, "dataset": args.dataset,
                                 "dataset_size": args.size, "max_length": args.max_length,
                                 "layers_to_skip": args.n})
model = load_model(cfg.model_path)
tok = load_tokenizer(model)
seqs, _ = calibration_sequences(cfg, tok, model.params, model.config)
fit, held = split_heldout(seqs, cfg.validation_fraction, cfg.validation_min_sequences, cfg.seed)
fit_b, held_b = batches_for(cfg, fit, tok), batches_for(cfg, held, tok)
if args.block:
    block = tuple(args.block)
else:
    starts = candidate_starts(model.config.num_hidden_layers, args.n)
    d = run_capture(model.params, model.config, CaptureSpec(distance_starts=tuple(starts), distance_n=args.n),
                    fit_b).distances()
    block = (min(d, key=d.get), min(d, key=d.get) + args.n)
acc = run_capture(model.params, model.config, CaptureSpec(stats_blocks=(block,), rows=RowPolicy()), fit_b,
                  heldout_batches=held_b)
rest, first = acc.sums["fit"]["rest"][0], acc.sums["fit"]["first"][0]
hrest, hfirst = acc.sums["heldout"]["rest"][0], acc.sums["heldout"]["first"][0]
energy_ratio = np.trace(first.A) / np.trace(rest.A)
task = load_task("wikitext2", None, args.windows)


def evaluate(T):
    params, config = replace_block(model.params, model.config, *block, T)
    heldout = perplexity(*sequence_nll(params, config, held, batch_size=8, max_length=cfg.max_length))
    wiki = run_task(params, config, tok, task, max_length=1024, batch_size=4).metrics["perplexity"] if args.windows else None
    return heldout, wiki


rows = []
start = time.time()
h, w = evaluate(None)
rows.append({"w": None, "alpha": None, "heldout_ppl": h, "wikitext2": w, "err_rest": hrest.relative_error(None),
             "err_first": hfirst.relative_error(None)})
print(f"block {block}, fit rows {rest.rows:.0f}+{first.rows:.0f}, held-out {len(held)} sequences, "
      f"energy ratio first/rest {energy_ratio:.3g}")
print(f"uidl: held-out {h:.1f}, wikitext2 {w}")
scale = float(np.mean(np.diag(rest.A)))
for w_text in args.weights.split(","):
    w_rel = energy_ratio if w_text == "include" else float(w_text)
    lam = w_rel / energy_ratio
    for a_text in args.alphas.split(","):
        alpha = float(a_text) * scale
        if alpha == 0 and rest.rows + (first.rows if lam else 0) < rest.A.shape[0]:
            continue
        T, _ = lstsq_from_normal_equations(rest.A + lam * first.A, rest.B + lam * first.B, alpha, False, "identity")
        h, wk = evaluate(T)
        row = {"w": w_text, "lambda": lam, "alpha": float(a_text), "heldout_ppl": h, "wikitext2": wk,
               "err_rest": hrest.relative_error(T), "err_first": hfirst.relative_error(T)}
        rows.append(row)
        print(f"w {w_text:>7} alpha {a_text:>5}: held-out {h:10.1f}  wikitext2 {wk if wk is None else round(wk, 1)}  "
              f"err rest {row['err_rest']:.4f} first {row['err_first']:.5f}", flush=True)
print(f"{time.time() - start:.0f} s")
if args.out:
    json.dump({"args": vars(args), "block": block, "energy_ratio": energy_ratio, "rows": rows},
              open(args.out, "w"), indent=1)
