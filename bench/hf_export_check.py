"""Does an HF directory written by this tool (``compress``, ``convert``) load in transformers, and does
transformers compute the same model as ours? Prints one JSON object (BENCHMARKS.md, "Gemma 2 / Gemma 3"
has the Gemma 3 270M results).

    .venv/bin/python bench/hf_export_check.py OUT_DIR [--prompt TEXT ...] [--random 600,350,17] [--out result.json]

Loads ``OUT_DIR`` twice: ``transformers.AutoModelForCausalLM.from_pretrained`` (float32, eager attention)
and ``replaceme_jax.conversion.load_model``; runs both on the prompts (tokenised by the directory's own
tokenizer, BOS included) and on a right-padded batch of random tokens of the given lengths (longer than
Gemma's 512-token window by default), and reports per input the largest absolute logit difference over
the real tokens, the largest logit, and the share of positions whose argmax agrees. Also the class
transformers picked, the layer count and ``layer_types`` as both read them. Needs torch (the ``test``
extra); the tool itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def ours(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import jax

    family = model.family
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p, i, m: family.forward(p, model.config, i, m).logits)(model.params, ids, mask)
    return np.asarray(out, np.float32)


def theirs(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    return out.float().numpy()


def compare(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict:
    keep = mask.astype(bool)
    a, b = a[keep], b[keep]
    return {"tokens": int(keep.sum()), "max_abs_diff": float(np.max(np.abs(a - b))),
            "max_abs_logit": float(np.max(np.abs(b))),
            "argmax_agreement": float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--random", default="600,350,17",
                        help="lengths of a padded batch of random tokens ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prompts = args.prompt or ["The capital of France is", "In 1905 Albert Einstein published four papers that"]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replaceme_jax.conversion import load_model

    t0 = time.time()
    hf = AutoModelForCausalLM.from_pretrained(args.directory, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(args.directory)
    tokenizer = AutoTokenizer.from_pretrained(args.directory)
    result = {"directory": args.directory, "transformers_class": type(hf).__name__,
              "layers": {"transformers": hf.config.num_hidden_layers, "ours": model.config.num_hidden_layers},
              "layer_types_agree": list(hf.config.layer_types) == list(model.config.layer_types),
              "inputs": {}}
    for prompt in prompts:
        ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
        mask = np.ones_like(ids)
        a, b = ours(model, ids, mask), theirs(hf, ids, mask)
        entry = compare(a, b, mask)
        entry["next_token"] = {"ours": tokenizer.decode(int(np.argmax(a[0, -1]))),
                               "transformers": tokenizer.decode(int(np.argmax(b[0, -1])))}
        result["inputs"][prompt] = entry
    if args.random:
        lengths = [int(n) for n in args.random.split(",")]
        rng = np.random.default_rng(args.seed)
        ids = np.zeros((len(lengths), max(lengths)), np.int32)
        mask = np.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.integers(0, model.config.vocab_size, n)
            mask[row, :n] = 1
        result["inputs"][f"random, right-padded, lengths {args.random}"] = compare(ours(model, ids, mask),
                                                                                  theirs(hf, ids, mask), mask)
    result["seconds"] = round(time.time() - t0)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
