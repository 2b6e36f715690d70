"""Screen every n-layer block of SmolLM2 on a cheap proxy: which block keeps LAMBADA when its lstsq map stands in?

One pass over the calibration data (the issue-16 setting: 256 C4 documents x 512, the same held-out split as
``compress``) holds every candidate block's normal equations; each block then gets the map at the first search
start (first-position weight 0, relative ridge 0.1), no refinement, and is scored on held-out C4 perplexity,
the first ``--lambada`` LAMBADA items and the first ``--windows`` WikiText-2 windows of 1024 tokens.

    .venv/bin/python bench/screen_blocks.py --n 8 --output bench/results/screen_blocks_n8.json

``--mc 300`` adds ARC-E and HellaSwag acc_norm on their first 300 items, the multiple-choice tasks a second
block costs most. ``--after 12,16`` first replaces block (12, 16) by its map (the same search start) and screens
the second block of a pair on that model (blocks named in the original numbering; candidates do not straddle the first).

The angular distance says how far a block moves the hidden state; this says what its map keeps downstream.
"""

from __future__ import annotations

import argparse
import functools
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
    parser.add_argument("--mc", type=int, default=0,
                        help="also ARC-E and HellaSwag acc_norm on their first MC items (the tasks a split costs most)")
    parser.add_argument("--after", default="", help="start,end of a block replaced by its map first")
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
    from replaceme_jax.models import family_for
    from replaceme_jax.replaceme.merge import replace_block
    from replaceme_jax.replaceme.pipeline import SEARCH_STARTS, LstsqFamily, _fit_at
    from replaceme_jax.replaceme.selection import candidate_starts
    from replaceme_jax.replaceme.validation import HeldoutEvaluator, limit_tokens

    cfg = from_dict(CompressConfig, dict(BASE, method="lstsq", layers_to_skip=args.n))
    model = load_model(cfg.model_path)
    tokenizer = load_tokenizer(model)
    sequences, sources = calibration_sequences(cfg, tokenizer, params=model.params, config=model.config)
    fit, heldout = split_heldout(sequences, cfg.validation_fraction, cfg.validation_min_sequences, cfg.seed)
    batches = batches_for(cfg, fit, tokenizer, sources)
    scored = batches_for(cfg, limit_tokens(heldout, cfg.validation_max_tokens), tokenizer)
    w, relative = SEARCH_STARTS[0]
    rows = RowPolicy(include_pad_rows=cfg.include_pad_rows, normalize=cfg.normalize_rows)

    def fitted(pass1, index, params, config, start):  # the map the merge writes for block ``start``
        family = LstsqFamily(cfg, pass1.sums["fit"]["rest"][index], pass1.sums["fit"]["first"][index])
        realize = functools.partial(family_for(config.model_type).realizable_output_map,
                                    params["layers"][start - 1], config)
        return _fit_at(cfg, family, realize, w, relative)[0]

    params, config, first, removed = model.params, model.config, None, 0
    if args.after:
        first = tuple(int(x) for x in args.after.split(","))
        pass0 = run_capture(params, config, CaptureSpec(stats_blocks=(first,), rows=rows), batches)
        params, config = replace_block(params, config, *first, fitted(pass0, 0, params, config, first[0]))
        removed = first[1] - first[0]

    def original_index(layer):  # a layer of the screened model in the original numbering
        return layer + removed if first and layer >= first[0] else layer

    starts = candidate_starts(config.num_hidden_layers, args.n, cfg.min_distance_layer)
    if first:  # blocks on one side of the first, in the screened model's numbering
        starts = [a for a in starts if a + args.n <= first[0] or a >= first[0]]
    wanted = [int(x) for x in args.starts.split(",")] if args.starts else None  # original numbering
    chosen = [a for a in starts if wanted is None or original_index(a) in wanted]
    blocks = tuple((a, a + args.n) for a in chosen)
    spec = CaptureSpec(distance_starts=tuple(starts), distance_n=args.n, stats_blocks=blocks, rows=rows)
    began = time.perf_counter()
    pass1 = run_capture(params, config, spec, batches)
    distances = pass1.distances()
    logging.info("pass 1: %.0f s", time.perf_counter() - began)
    lambada = load_task("lambada_openai", DATA / "eval", args.lambada)
    wikitext = load_task("wikitext2", DATA / "eval", args.windows)
    choices = {name: load_task(name, DATA / "eval", args.mc) for name in ("arc_easy", "hellaswag")} if args.mc else {}
    out_path = Path(args.output)
    table = {"n": args.n, "after": list(first) if first else None, "first_token_weight": w,
             "alpha_relative": relative, "lambada_items": args.lambada, "wikitext_windows": args.windows,
             "mc_items": args.mc, "blocks": {}}
    for index, (start, end) in enumerate(blocks):
        began = time.perf_counter()
        T = fitted(pass1, index, params, config, start)
        evaluator = HeldoutEvaluator(params, config, start, end, scored)
        row = {"distance": distances[start], "heldout_perplexity": evaluator.perplexity(T),
               "heldout_perplexity_dropped": evaluator.perplexity(None)}
        del evaluator
        pruned = replace_block(params, config, start, end, T)
        row["lambada_acc"] = run_task(*pruned, tokenizer, lambada, max_length=1024, batch_size=16).metrics["acc"]
        row["wikitext2_perplexity"] = run_task(*pruned, tokenizer, wikitext, max_length=1024,
                                               batch_size=16).metrics["perplexity"]
        for task_name, task in choices.items():
            row[f"{task_name}_acc_norm"] = run_task(*pruned, tokenizer, task, max_length=1024,
                                                    batch_size=16).metrics["acc_norm"]
        row["seconds"] = round(time.perf_counter() - began, 1)
        name = f"{original_index(start)},{original_index(end - 1) + 1}"
        table["blocks"][name] = row
        logging.info("(%s): %s", name, row)
        out_path.write_text(json.dumps(table, indent=2))
    for key, row in sorted(table["blocks"].items(), key=lambda kv: -kv[1]["lambada_acc"]):
        print(f"({key}) distance {row['distance']:.4f} held-out {row['heldout_perplexity']:.1f} "
              f"(dropped {row['heldout_perplexity_dropped']:.1f}) LAMBADA {row['lambada_acc']:.3f} "
              f"WikiText-2 {row['wikitext2_perplexity']:.1f}"
              + "".join(f" {name} {row[name + '_acc_norm']:.3f}" for name in choices))


if __name__ == "__main__":
    main()
