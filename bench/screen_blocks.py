"""Screen every n-layer block of SmolLM2 on a cheap proxy: which block keeps LAMBADA when its lstsq map stands in?

One pass over the calibration data (the issue-16 setting: 256 C4 documents x 512, the same held-out split as
``compress``) holds every candidate block's normal equations; each block then gets the map at the first search
start (first-position weight 0, relative ridge 0.1), no refinement, and is scored on held-out C4 perplexity,
the first ``--lambada`` LAMBADA items and the first ``--windows`` WikiText-2 windows of 1024 tokens.

    .venv/bin/python bench/screen_blocks.py --n 8 --output bench/results/screen_blocks_n8.json

The angular distance says how far a block moves the hidden state; this says what its map keeps downstream.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--starts", default="", help="comma list of block starts (default: every candidate)")
    parser.add_argument("--lambada", type=int, default=500, help="LAMBADA items")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 1024 tokens")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

    from replaceme_smollm2 import BASE, DATA

    from replaceme_jax.capture import CaptureSpec, RowPolicy, run_capture
    from replaceme_jax.config import CompressConfig, from_dict
    from replaceme_jax.conversion import load_model, load_tokenizer
    from replaceme_jax.data import batches_for, calibration_sequences, split_heldout
    from replaceme_jax.evaluation import load_task, run_task
    from replaceme_jax.replaceme.merge import replace_block
    from replaceme_jax.replaceme.pipeline import SEARCH_STARTS, LstsqFamily
    from replaceme_jax.replaceme.selection import candidate_starts
    from replaceme_jax.replaceme.validation import HeldoutEvaluator, limit_tokens

    cfg = from_dict(CompressConfig, dict(BASE, method="lstsq", layers_to_skip=args.n))
    model = load_model(cfg.model_path)
    tokenizer = load_tokenizer(model)
    sequences, sources = calibration_sequences(cfg, tokenizer, params=model.params, config=model.config)
    fit, heldout = split_heldout(sequences, cfg.validation_fraction, cfg.validation_min_sequences, cfg.seed)
    batches = batches_for(cfg, fit, tokenizer, sources)
    scored = batches_for(cfg, limit_tokens(heldout, cfg.validation_max_tokens), tokenizer)
    starts = candidate_starts(model.config.num_hidden_layers, args.n, cfg.min_distance_layer)
    chosen = [int(s) for s in args.starts.split(",")] if args.starts else starts
    blocks = tuple((s, s + args.n) for s in chosen)
    spec = CaptureSpec(distance_starts=tuple(starts), distance_n=args.n, stats_blocks=blocks,
                       rows=RowPolicy(include_pad_rows=cfg.include_pad_rows, normalize=cfg.normalize_rows))
    began = time.perf_counter()
    pass1 = run_capture(model.params, model.config, spec, batches)
    distances = pass1.distances()
    logging.info("pass 1: %.0f s", time.perf_counter() - began)
    lambada = load_task("lambada_openai", DATA / "eval", args.lambada)
    wikitext = load_task("wikitext2", DATA / "eval", args.windows)
    w, relative = SEARCH_STARTS[0]
    out_path = Path(args.output)
    table = {"n": args.n, "first_token_weight": w, "alpha_relative": relative, "lambada_items": args.lambada,
             "wikitext_windows": args.windows, "blocks": {}}
    for index, (start, end) in enumerate(blocks):
        began = time.perf_counter()
        family = LstsqFamily(cfg, pass1.sums["fit"]["rest"][index], pass1.sums["fit"]["first"][index])
        T, _ = family.solve(w, family.absolute_alpha(relative))
        evaluator = HeldoutEvaluator(model.params, model.config, start, end, scored)
        row = {"distance": distances[start], "heldout_perplexity": evaluator.perplexity(T),
               "heldout_perplexity_dropped": evaluator.perplexity(None)}
        del evaluator
        params, config = replace_block(model.params, model.config, start, end, T)
        row["lambada_acc"] = run_task(params, config, tokenizer, lambada, max_length=1024, batch_size=16).metrics["acc"]
        row["wikitext2_perplexity"] = run_task(params, config, tokenizer, wikitext, max_length=1024,
                                               batch_size=16).metrics["perplexity"]
        row["seconds"] = round(time.perf_counter() - began, 1)
        table["blocks"][f"{start},{end}"] = row
        logging.info("(%d, %d): %s", start, end, row)
        out_path.write_text(json.dumps(table, indent=2))
    for key, row in sorted(table["blocks"].items(), key=lambda kv: -kv[1]["lambada_acc"]):
        print(f"({key}) distance {row['distance']:.4f} held-out {row['heldout_perplexity']:.1f} "
              f"(dropped {row['heldout_perplexity_dropped']:.1f}) LAMBADA {row['lambada_acc']:.3f} "
              f"WikiText-2 {row['wikitext2_perplexity']:.1f}")


if __name__ == "__main__":
    main()
