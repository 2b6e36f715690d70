"""What a BOS token in front of each scored sequence changes, for models whose evaluation (``evaluate``)
scores without one. Prints one JSON object; BENCHMARKS.md ("Gemma 2 / Gemma 3") has the Gemma 3 figures.

    .venv/bin/python bench/bos_check.py MODEL [MODEL ...] [--lambada 80] [--windows 8] [--out result.json]

The evaluator tokenises with ``add_special_tokens=False`` and scores WikiText-2 windows of 1024 tokens
with the first token as the only context, as lm-evaluation-harness does for most models; the harness
puts a BOS in front for Gemma (``HFLM`` turns ``add_bos_token`` on for every ``gemma*`` model type), and
Gemma is trained with one. Per model, with the evaluator's own functions (``load_task``,
``tokenize_pairs``, ``encode``, ``perplexity_windows``, ``score_requests``):

- LAMBADA, first ``--lambada`` items: accuracy (greedy) and perplexity of the last word, the contexts as
  the evaluator tokenises them, and the same with the BOS id put in front of each context;
- WikiText-2: the evaluator's tokenisation cut into windows of 1023 tokens (first ``--windows``), each
  scored in full after a BOS (1023 predicted tokens a window, as the evaluator's 1024-token windows).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.evaluation import encode, load_task, perplexity_windows, score_requests, tokenize_pairs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data-dir", default=None, help="task files (default: ../shared/data/eval)")
    parser.add_argument("--lambada", type=int, default=80)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    lambada = load_task("lambada_openai", args.data_dir, args.lambada)
    wikitext = load_task("wikitext2", args.data_dir, args.windows)
    result = {"lambada_items": args.lambada, "wikitext2_windows": args.windows, "models": {}}
    for src in args.models:
        t0 = time.time()
        model = load_model(src)
        tokenizer = load_tokenizer(model)
        bos = tokenizer.bos_token_id
        entry = result["models"][src] = {}
        requests = tokenize_pairs(tokenizer, lambada.items)
        for name, prefix in (("lambada", []), ("lambada_bos", [bos])):
            scores = score_requests(model.params, model.config, [(prefix + list(c), t) for c, t in requests])
            entry[name] = {"acc": float(np.mean(scores.greedy)), "perplexity": float(math.exp(-scores.logprob.mean()))}
        windows = perplexity_windows(encode(tokenizer, [wikitext.text])[0], 1023)[:args.windows]
        scores = score_requests(model.params, model.config, [([bos], list(w)) for w in windows], max_length=1024)
        entry["wikitext2_bos"] = {"perplexity": float(math.exp(-scores.logprob.sum() / scores.num_tokens.sum())),
                                  "tokens": int(scores.num_tokens.sum())}
        entry["seconds"] = round(time.time() - t0)
        print(src, entry, flush=True)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
