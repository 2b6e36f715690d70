"""The demo check of the first-run issue: run a compress config, the same block dropped without T (UIDL),
and compare WikiText-2 perplexity (first 8 windows of 1024 tokens) and greedy continuations.

    .venv/bin/python bench/first_run.py --config configs/default.yaml [--prompt "The capital of France is"]

Prints one JSON object: wall time of the compress run, the blocks, both perplexities, the continuations
and whether any has a repeated-token loop (the same token 4+ times in a row, or a 1-3-token pattern
repeated 4+ times).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from replaceme_jax.config import CompressConfig, load_config
from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.evaluation import run_evaluation
from replaceme_jax.eval_generation import greedy_continuations
from replaceme_jax.replaceme.pipeline import compress


def greedy(model_dir: str, prompt: str, new_tokens: int) -> tuple[str, list[int]]:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model)
    (text,) = greedy_continuations(model.params, model.config, tokenizer, [prompt], max_new_tokens=new_tokens).texts
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def has_loop(tokens: list[int]) -> bool:
    for period in (1, 2, 3):
        for i in range(len(tokens) - 4 * period + 1):
            unit = tokens[i:i + period]
            if all(tokens[i + k * period:i + (k + 1) * period] == unit for k in range(4)):
                return True
    return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--windows", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("replaceme_jax").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="first_run_"))
    cfg = load_config(CompressConfig, args.config, args.set + [f"save_path={work / 'ours'}"])
    began = time.perf_counter()
    result = compress(cfg)
    seconds = time.perf_counter() - began
    uidl = load_config(CompressConfig, args.config,
                       args.set + [f"save_path={work / 'uidl'}", "method=uidl"])
    compress(uidl)
    models = [cfg.model_path, str(work / "ours"), str(work / "uidl")]
    report = run_evaluation(models, ["wikitext2"], limit=args.windows, progress=False)
    ppl = [m["results"]["wikitext2"]["perplexity"] for m in report["models"].values()]
    generations = {}
    for name, path in zip(("original", "ours", "uidl"), models):
        text, tokens = greedy(path, args.prompt, args.new_tokens)
        generations[name] = {"text": text, "loop": has_loop(tokens)}
    print(json.dumps({
        "config": args.config, "overrides": args.set, "compress_seconds": round(seconds, 1),
        "blocks": result.report["blocks"],
        "validation": [b.get("validation", {}).get("perplexity_with_T") for b in result.report["block_results"]],
        "fallback": [b.get("validation", {}).get("fallback") for b in result.report["block_results"]],
        "chosen": [{k: b["solver"].get(k) for k in ("first_token_weight", "alpha_relative")}
                   for b in result.report["block_results"]],
        "wikitext2_windows": args.windows,
        "perplexity": dict(zip(("original", "ours", "uidl"), ppl)),
        "greedy": generations,
    }, indent=1))


if __name__ == "__main__":
    main()
