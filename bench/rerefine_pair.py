"""Two removed blocks, then one more refinement of the first block's T with the second already replaced.

``compress`` fits and refines the blocks of a multi-block run in order: the second block's T is fitted and
refined on the model whose first block is already replaced, but the first T was refined while the second
block was still there. This measures one more round of coordinate descent: the first block's T refined
again (same steps, rate and tokens as ``compress``'s) on the model with the second block replaced by its
T, kept only if the held-out perplexity of the whole pruned model drops, then the usual evaluation.
``--block second`` refines the second block's T instead, with the first replaced; ``--steps`` and ``--lr``
change the round's settings.

    .venv/bin/python bench/rerefine_pair.py --blocks 12,16,17,21 --output /tmp/rerefine.json

Calibration as bench/replaceme_smollm2.py (the first 256 C4 documents, 8 x 512, the same held-out split).

Or start from a finished two-block ``compress`` output instead of running compress again: its two T's
(``replaceme/transforms.safetensors``) and its run config (calibration, split, refinement settings) are
read from the directory, and the pruned model can be written for ``replaceme-jax evaluate``:

    .venv/bin/python bench/rerefine_pair.py --from-output outputs/smollm2-13-20-25-26-c4-1000 --steps 107 \
        --unseen-first --limit 0 --save outputs/rerefined --output /tmp/rerefine.json
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--from-output", help="a two-block compress output directory: its T's and run config")
    parser.add_argument("--block", choices=("first", "second"), default="first",
                        help="which block's T the second round refines, the other block replaced by its T")
    parser.add_argument("--steps", type=int, help="the second round's Adam steps (default: the run's refine_steps)")
    parser.add_argument("--lr", type=float, help="the second round's Adam rate (default: the run's refine_lr)")
    parser.add_argument("--unseen-first", action="store_true",
                        help="start the second round on the batches the first round's steps did not reach")
    parser.add_argument("--save", help="write the pruned model here as an HF directory")
    parser.add_argument("--limit", type=int, default=500, help="items per task for the evaluation; 0 skips it")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

    from replaceme_smollm2 import BASE, TASKS, average_of_four, evaluate_params

    from replaceme_jax.config import CompressConfig, from_dict, to_dict
    from replaceme_jax.conversion import export_hf, load_model, load_tokenizer
    from replaceme_jax.data import batches_for, calibration_sequences, split_heldout
    from replaceme_jax.evaluation import Reference
    from replaceme_jax.replaceme.merge import replace_block
    from replaceme_jax.replaceme.pipeline import (REFINE_MIN_RELATIVE_GAIN, compress, read_transforms,
                                                  write_transforms)
    from replaceme_jax.replaceme.refine import batches_for_tokens, refine_kl
    from replaceme_jax.replaceme.validation import HeldoutEvaluator, limit_tokens
    from replaceme_jax.report import write_json

    if args.from_output:
        out = Path(args.from_output)
        report = json.loads((out / "replaceme_report.json").read_text())
        cfg = from_dict(CompressConfig, dict(report["config"], save_path=None))
        (s1, e1), (s2, e2) = report["blocks"]
    else:
        s1, e1, s2, e2 = (int(x) for x in args.blocks.split(","))
        cfg = from_dict(CompressConfig, dict(BASE, method="lstsq", layers_to_skip=e1 - s1, num_A=2,
                                             blocks=[[s1, e1], [s2, e2]], refine="kl"))
    steps = args.steps or cfg.refine_steps
    lr = args.lr or cfg.refine_lr
    # the model and the calibration sequences once, for compress and for the second round
    original = load_model(cfg.model_path)
    tokenizer = load_tokenizer(original)
    sequences, sources = calibration_sequences(cfg, tokenizer, params=original.params, config=original.config)
    if args.from_output:
        compress_s = sum(report["wall_time_s"].values())
        transforms = read_transforms(out)
        T1, T2 = transforms[(s1, e1)], transforms[(s2, e2)]
        compress_heldout = [b["validation"].get("perplexity_with_T") for b in report["block_results"]]
    else:
        began = time.perf_counter()
        result = compress(cfg, model=original, sequences=sequences, tokenizer=tokenizer)
        compress_s = time.perf_counter() - began
        T1, T2 = (b.T for b in result.blocks)
        if T1 is None or T2 is None:
            raise SystemExit("a block fell back to dropping; nothing to re-refine")
        compress_heldout = [b.validation and b.validation.get("perplexity_with_T") for b in result.blocks]

    # the same split and batches as compress made of those sequences
    fit, heldout = split_heldout(sequences, cfg.validation_fraction, cfg.validation_min_sequences, cfg.seed)
    chosen = batches_for_tokens(batches_for(cfg, fit, tokenizer, sources), cfg.refine_tokens)
    if args.unseen_first:
        # the first round's steps took one batch each from the front of this list
        chosen = chosen[cfg.refine_steps:] + chosen[:cfg.refine_steps]
    scored = batches_for(cfg, limit_tokens(heldout, cfg.validation_max_tokens), tokenizer)

    Ts = {(s1, e1): T1, (s2, e2): T2}  # original numbering
    block = (s1, e1) if args.block == "first" else (s2, e2)
    T0 = Ts[block]
    if args.block == "first":
        # the second block replaced by its T, the first still there
        base, base_config = replace_block(original.params, original.config, s2, e2, T2)
        start, end = s1, e1
    else:
        # the first block replaced by its T; the second, renumbered, still there
        base, base_config = replace_block(original.params, original.config, s1, e1, T1)
        start, end = s2 - (e1 - s1), e2 - (e1 - s1)
    evaluator = HeldoutEvaluator(base, base_config, start, end, scored)
    before = evaluator.perplexity(T0)
    began = time.perf_counter()
    refined = refine_kl(original.params, original.config, base, base_config, start, end, T0, chosen,
                        steps=steps, lr=lr, top_k=cfg.refine_top_k)
    after = evaluator.perplexity(refined.T)
    kept = after < before * (1 - REFINE_MIN_RELATIVE_GAIN)  # compress's rule
    record = {"blocks": [[s1, e1], [s2, e2]], "rerefined_block": block, "from_output": args.from_output,
              "compress_s": compress_s and round(compress_s, 1),
              "rerefine_s": round(time.perf_counter() - began, 1), "steps": refined.steps, "lr": lr,
              "unseen_first": args.unseen_first, "batches": len(chosen), "tokens": refined.tokens,
              "kl_first": refined.losses[0], "kl_last": refined.losses[-1], "kl": refined.losses,
              "heldout_perplexity_before": before, "heldout_perplexity_after": after, "kept": bool(kept),
              "compress_heldout_perplexity": compress_heldout}
    logging.info("re-refined block (%d, %d): held-out perplexity %.3f -> %.3f (%s)", *block, before, after,
                 "kept" if kept else "not kept")
    Ts[block] = refined.T if kept else T0
    params, config = replace_block(base, base_config, start, end, Ts[block])
    if args.save:
        def write_side_files(tmp):
            # the T's and the run's report, so that --from-output can start another round from this directory
            write_transforms(tmp, Ts)
            rounds = report.get("rerefine", []) if args.from_output else []
            summary = {k: v for k, v in record.items() if k != "kl"}
            write_json(tmp / "replaceme_report.json",
                       dict(report if args.from_output else {"config": to_dict(cfg), "blocks": record["blocks"]},
                            rerefine=rounds + [summary]))

        export_hf(dataclasses.replace(original, params=params, config=config), args.save, dtype=cfg.save_dtype,
                  write_extra=write_side_files)
    if args.limit:
        reference = Reference(original.params, original.config)
        record["results"], record["outcomes"] = evaluate_params(params, config, tokenizer, TASKS, args.limit,
                                                                args.windows, 16, reference,
                                                                ("wikitext2", "lambada_openai"))
    Path(args.output).write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.limit:
        r = record["results"]
        print(f"WikiText-2 {r['wikitext2']['perplexity']:.1f}, LAMBADA {r['lambada_openai']['acc']:.3f}, "
              f"avg of 4 {average_of_four(r):.4f}")


if __name__ == "__main__":
    main()
