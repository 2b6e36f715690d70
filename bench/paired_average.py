"""Is a pruned model's share of the original's average accuracy beyond noise? A paired comparison.

Reads `replaceme-jax evaluate` reports or `bench/replaceme_smollm2.py` results (one or more files; the
first model found is the original) and
prints, for the issue-16 average of four (ARC-E, PIQA and HellaSwag acc_norm, WinoGrande acc) and for
each task, the pruned model's figure with the standard error of its paired comparison with the
original on the same items, on the first N items of each task for each N asked:

    python bench/paired_average.py original.json pruned.json --first 500,all --output result.json

The share R = pruned average / original average. Its standard error is the delta method's on the
per-item outcomes: R - 0.95 is a mean of per-item terms b_i - R a_i, so
se(R) = sqrt(sum_t var_t(b - R a) / n_t) / (4 A) over the four tasks t (A: the original's average). A
bootstrap over items (each task resampled on its own, both models' outcomes together) checks it.
Paired, because the two models answer most items alike: the unpaired standard error of an average of
four at 500 items a task (about 0.011) overstates the noise in the share several times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from replaceme_jax.evaluation import binomial_stderr, paired_difference

FOUR = (("arc_easy", "acc_norm"), ("piqa", "acc_norm"), ("hellaswag", "acc_norm"), ("winogrande", "acc"))


def models_of(paths: list[str]) -> dict:
    models = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name, entry in data.get("models", data).items():  # an evaluate report, or the bench's table
            if "outcomes" not in entry:
                raise SystemExit(f"{path}: {name} has no per-item outcomes (an evaluate report older than them)")
            models[name if name not in models else f"{name} ({path})"] = entry
    if len(models) < 2:
        raise SystemExit("need an original and at least one pruned model")
    return models


def share_of_average(a: list[np.ndarray], b: list[np.ndarray], resamples: int, rng) -> dict:
    """R = mean of b's task accuracies / mean of a's, its delta-method standard error and a bootstrap's."""
    big_a, big_b = np.mean([x.mean() for x in a]), np.mean([x.mean() for x in b])
    share = big_b / big_a
    terms = [(y - share * x) for x, y in zip(a, b)]
    delta = float(np.sqrt(sum(t.var(ddof=1) / t.size for t in terms)) / (len(a) * big_a))
    boot = np.zeros(resamples)
    for k in range(resamples):
        picks = [rng.integers(0, x.size, x.size) for x in a]
        boot[k] = (np.mean([y[p].mean() for y, p in zip(b, picks)])
                   / np.mean([x[p].mean() for x, p in zip(a, picks)]))
    return {"original": float(big_a), "pruned": float(big_b), "share": float(share), "stderr_delta": delta,
            "stderr_bootstrap": float(boot.std(ddof=1)), "bootstrap_share_below_0.95": float(np.mean(boot < 0.95)),
            "unpaired_stderr_of_pruned_average": float(np.sqrt(sum(y.var(ddof=1) / y.size for y in b)) / len(b))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="evaluate reports; the first model in them is the original")
    parser.add_argument("--first", default="500,all", help="comma list: items per task (first N), or all")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--output")
    args = parser.parse_args()
    models = models_of(args.reports)
    names = list(models)
    original = models[names[0]]
    out = {"original": names[0], "reports": args.reports, "pruned": {}}
    for name in names[1:]:
        entry = models[name]
        out["pruned"][name] = per_n = {}
        for first in args.first.split(","):
            limit = None if first == "all" else int(first)
            rows = {}
            for task in original["outcomes"]:
                if task not in entry["outcomes"]:
                    continue
                for metric, values in original["outcomes"][task].items():
                    x = np.asarray(values[:limit], np.float64)
                    y = np.asarray(entry["outcomes"][task][metric][:limit], np.float64)
                    if x.size != y.size:
                        raise SystemExit(f"{task}: {x.size} items for {names[0]}, {y.size} for {name}")
                    paired = paired_difference(x, y)
                    rows[f"{task} {metric}"] = {"n": int(x.size), "original": float(x.mean()), "pruned": float(y.mean()),
                                                "difference": paired["difference"], "paired_stderr": paired["stderr"],
                                                "pruned_stderr": binomial_stderr(y)}
            result = {"tasks": rows}
            if all(t in entry["outcomes"] and t in original["outcomes"] for t, _ in FOUR):
                a = [np.asarray(original["outcomes"][t][m][:limit], np.float64) for t, m in FOUR]
                b = [np.asarray(entry["outcomes"][t][m][:limit], np.float64) for t, m in FOUR]
                # a fresh seeded generator per comparison: each figure is the same whatever else was asked
                result["average_of_four"] = share_of_average(a, b, args.resamples, np.random.default_rng(0))
            per_n[first] = result
            print(f"\n{name} against {names[0]}, first {first} items a task:")
            print("| task metric | n | original | pruned ± se | difference ± paired se |\n|---|---:|---:|---:|---:|")
            for key, r in rows.items():
                print(f"| {key} | {r['n']} | {r['original']:.4f} | {r['pruned']:.4f} ± {r['pruned_stderr']:.4f} "
                      f"| {r['difference']:+.4f} ± {r['paired_stderr']:.4f} |")
            if "average_of_four" in result:
                s = result["average_of_four"]
                print(f"average of four: {s['pruned']:.4f} / {s['original']:.4f} = {100 * s['share']:.2f}% "
                      f"± {100 * s['stderr_delta']:.2f} (delta), ± {100 * s['stderr_bootstrap']:.2f} (bootstrap); "
                      f"bootstrap share below 95%: {s['bootstrap_share_below_0.95']:.3f}; unpaired se of the "
                      f"pruned average {s['unpaired_stderr_of_pruned_average']:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
