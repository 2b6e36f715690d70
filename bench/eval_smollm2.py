"""The evaluator on the real SmolLM2-135M against the transformers reference figures of MODELS.md.

    .venv/bin/python bench/eval_smollm2.py [--model smollm2-135m] [--batch-size 8] [--torch]

Checks WikiText-2 perplexity over the first 40 windows of 1024 tokens (reference 24.40) and ARC-Easy
acc_norm on the first 200 questions (reference 0.460), each within 0.5% relative, and prints wall time
and throughput (tokens/s). ``--torch`` also recomputes both figures with transformers (float32) on the
very same tokens, which takes a few minutes on 2 CPU cores. Exits 1 if a figure is out of tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replaceme_jax.conversion import load_model, load_tokenizer  # noqa: E402
from replaceme_jax import evaluation as ev  # noqa: E402

REFERENCE = {"wikitext2": ("perplexity", 24.40, 40), "arc_easy": ("acc_norm", 0.460, 200)}
RELATIVE_TOLERANCE = 0.005
WINDOW = 1024


def torch_reference(source: str, tokenizer, tasks: dict) -> dict:
    """The same figures with transformers, scoring each sequence alone (no padding at all)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(source)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def loglikelihood(context, continuation):
        tokens = (context + continuation)[-(WINDOW + 1):]
        k = min(len(continuation), len(tokens) - 1)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0, -k:]
        return torch.log_softmax(logits.double(), -1)[torch.arange(k), torch.tensor(tokens[-k:])].sum().item()

    windows = ev.perplexity_windows(ev.encode(tokenizer, [tasks["wikitext2"].text])[0], WINDOW)[:40]
    nll = -sum(loglikelihood(w[:1].tolist(), w[1:].tolist()) for w in windows) / (len(windows) * (WINDOW - 1))
    correct = 0
    for item in tasks["arc_easy"].items:
        lls = [loglikelihood(c, t) for c, t in ev.tokenize_pairs(tokenizer, item.options)]
        normed = [ll / n for ll, n in zip(lls, item.norm_lengths)]
        correct += max(range(len(normed)), key=normed.__getitem__) == item.gold
    return {"wikitext2": math.exp(nll), "arc_easy": correct / len(tasks["arc_easy"].items)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="GGUF file or 'smollm2-135m'")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--torch", action="store_true", help="recompute the reference with transformers")
    args = parser.parse_args()

    start = time.perf_counter()
    model = load_model(args.model)
    tokenizer = load_tokenizer(model)
    print(f"loaded {model.source} in {time.perf_counter() - start:.1f} s")
    tasks = {name: ev.load_task(name, args.data_dir, limit) for name, (_, _, limit) in REFERENCE.items()}

    ok, summary = True, {}
    for name, (metric, reference, _) in REFERENCE.items():
        result = ev.run_task(model.params, model.config, tokenizer, tasks[name], max_length=WINDOW,
                             batch_size=args.batch_size, progress=True)
        scores, value = result.scores, result.metrics[metric]
        relative = abs(value - reference) / reference
        ok &= relative <= RELATIVE_TOLERANCE
        summary[name] = {metric: value, "n": result.metrics["n"], "reference": reference,
                         "relative_difference": relative, "seconds": scores.seconds,
                         "compile_and_first_batches_seconds": scores.warmup_seconds, "tokens": scores.input_tokens,
                         "tokens_per_second_overall": scores.input_tokens / scores.seconds,
                         "tokens_per_second_steady": scores.tokens_per_second}
        print(f"{name}: {metric} {value:.4f} (reference {reference}, {100 * relative:.2f}% off) | "
              f"{scores.seconds:.1f} s for {scores.input_tokens} tokens: "
              f"{scores.input_tokens / scores.seconds:.0f} tokens/s overall, "
              f"{scores.tokens_per_second:.0f} tokens/s after compilation")

    if args.torch:
        start = time.perf_counter()
        figures = torch_reference(model.tokenizer_source, tokenizer, tasks)
        for name, value in figures.items():
            summary[name]["transformers"] = value
            print(f"{name}: transformers on the same tokens {value:.4f}")
        print(f"transformers reference took {time.perf_counter() - start:.1f} s")
    print(json.dumps(summary, indent=2))
    print("OK: within 0.5% of the reference" if ok else "FAIL: outside 0.5% of the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
