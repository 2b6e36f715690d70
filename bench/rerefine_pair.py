"""Two removed blocks, then one more refinement of the first block's T with the second already replaced.

``compress`` fits and refines the blocks of a multi-block run in order: the second block's T is fitted and
refined on the model whose first block is already replaced, but the first T was refined while the second
block was still there. This measures one more round of coordinate descent: the first block's T refined
again (same steps, rate and tokens as ``compress``'s) on the model with the second block replaced by its
T, kept only if the held-out perplexity of the whole pruned model drops, then the usual evaluation.

    .venv/bin/python bench/rerefine_pair.py --blocks 12,16,17,21 --output /tmp/rerefine.json

Calibration as bench/replaceme_smollm2.py (the first 256 C4 documents, 8 x 512, the same held-out split).
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
    parser.add_argument("--blocks", default="12,16,17,21", help="start1,end1,start2,end2 (original numbering)")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

    from replaceme_smollm2 import BASE, TASKS, average_of_four, evaluate_params

    from replaceme_jax.config import CompressConfig, from_dict
    from replaceme_jax.conversion import load_model, load_tokenizer
    from replaceme_jax.data import batches_for, calibration_sequences, split_heldout
    from replaceme_jax.evaluation import Reference
    from replaceme_jax.replaceme.merge import replace_block
    from replaceme_jax.replaceme.pipeline import REFINE_MIN_RELATIVE_GAIN, compress
    from replaceme_jax.replaceme.refine import batches_for_tokens, refine_kl
    from replaceme_jax.replaceme.validation import HeldoutEvaluator, limit_tokens

    s1, e1, s2, e2 = (int(x) for x in args.blocks.split(","))
    n = e1 - s1
    cfg = from_dict(CompressConfig, dict(BASE, method="lstsq", layers_to_skip=n, num_A=2,
                                         blocks=[[s1, e1], [s2, e2]], refine="kl"))
    # the model and the calibration sequences once, for compress and for the second round
    original = load_model(cfg.model_path)
    tokenizer = load_tokenizer(original)
    sequences, sources = calibration_sequences(cfg, tokenizer, params=original.params, config=original.config)
    began = time.perf_counter()
    result = compress(cfg, model=original, sequences=sequences, tokenizer=tokenizer)
    compress_s = time.perf_counter() - began
    T1, T2 = (b.T for b in result.blocks)
    if T1 is None or T2 is None:
        raise SystemExit("a block fell back to dropping; nothing to re-refine")

    # the same split and batches as compress made of those sequences
    fit, heldout = split_heldout(sequences, cfg.validation_fraction, cfg.validation_min_sequences, cfg.seed)
    chosen = batches_for_tokens(batches_for(cfg, fit, tokenizer, sources), cfg.refine_tokens)
    scored = batches_for(cfg, limit_tokens(heldout, cfg.validation_max_tokens), tokenizer)

    # the second block (original numbering) replaced by its T, the first still there
    params2, config2 = replace_block(original.params, original.config, s2, e2, T2)
    evaluator = HeldoutEvaluator(params2, config2, s1, e1, scored)
    before = evaluator.perplexity(T1)
    began = time.perf_counter()
    refined = refine_kl(original.params, original.config, params2, config2, s1, e1, T1, chosen,
                        steps=cfg.refine_steps, lr=cfg.refine_lr, top_k=cfg.refine_top_k)
    after = evaluator.perplexity(refined.T)
    kept = after < before * (1 - REFINE_MIN_RELATIVE_GAIN)  # compress's rule
    record = {"blocks": [[s1, e1], [s2, e2]], "compress_s": round(compress_s, 1),
              "rerefine_s": round(time.perf_counter() - began, 1), "steps": refined.steps, "tokens": refined.tokens,
              "kl_first": refined.losses[0], "kl_last": refined.losses[-1],
              "heldout_perplexity_before": before, "heldout_perplexity_after": after, "kept": bool(kept),
              "compress_heldout_perplexity": [b.validation and b.validation.get("perplexity_with_T")
                                              for b in result.blocks]}
    logging.info("re-refined block (%d, %d): held-out perplexity %.3f -> %.3f (%s)", s1, e1, before, after,
                 "kept" if kept else "not kept")
    params, config = replace_block(params2, config2, s1, e1, refined.T if kept else T1)
    reference = Reference(original.params, original.config)
    record["results"], record["outcomes"] = evaluate_params(params, config, tokenizer, TASKS, args.limit, args.windows,
                                                            16, reference, ("wikitext2", "lambada_openai"))
    Path(args.output).write_text(json.dumps(record, indent=2, default=str) + "\n")
    r = record["results"]
    print(f"WikiText-2 {r['wikitext2']['perplexity']:.1f}, LAMBADA {r['lambada_openai']['acc']:.3f}, "
          f"avg of 4 {average_of_four(r):.4f}")


if __name__ == "__main__":
    main()
