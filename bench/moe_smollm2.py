"""Expert pruning and merging on the MoEfied SmolLM2 (``bench/moefy_smollm2.py``): a table.

    .venv/bin/python bench/moe_smollm2.py --moe /tmp/smollm2-moe --work /tmp/moe_bench

Rows: the dense SmolLM2-135M, its MoE version, and frequency / REAP / REAM at 25% and 50% of the
experts removed (plus any ``--extra`` rows). Every compression runs the real ``replaceme-jax experts``
command in a fresh process (so its wall time and peak RSS are its own; both come from its
``experts_report.json``) and writes an HF directory; the evaluation loads that directory (so the
export is exercised too) and runs WikiText-2 perplexity (first ``--windows`` windows of 1024 tokens),
ARC-Easy and HellaSwag (first ``--limit`` items, acc_norm). Calibration: the first 128 C4 documents
of shared/data, max_length 512. REAM's group size scales the paper's (C = N/8 for 25% removed,
N/4 for 50%; 16 and 32 for 128 experts). Results are kept in ``--output`` (JSON) as they come, so an
interrupted run resumes where it stopped; ``--markdown`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

CALIBRATION = dict(dataset=str(DATA / "calibration" / "c4_sample.jsonl"), dataset_column="text", dataset_size=128,
                   batch_size=8, max_length=512)
TASKS = ("wikitext2", "arc_easy", "hellaswag")


def variants(num_experts: int) -> dict:
    out = {}
    for ratio in (0.25, 0.5):
        pct = int(ratio * 100)
        for method in ("frequency", "reap", "ream"):
            keys = dict(method=method, compression_ratio=ratio)
            if method == "ream":
                keys["group_size"] = max(2, int(num_experts * ratio / 2))
            out[f"{method}_{pct}"] = keys
    # The calibration data matters as much as the method: the same REAP run on a C4 + WikiText-2 mixture.
    out["reap_50_mixture"] = dict(method="reap", compression_ratio=0.5, dataset=[
        {"dataset": CALIBRATION["dataset"], "ratio": 0.5},
        {"dataset": str(DATA / "calibration" / "wikitext2_train_excerpt.txt"), "ratio": 0.5}])
    return out


def compress(name: str, keys: dict, moe_dir: Path, work: Path) -> dict:
    out = work / name
    config = dict(CALIBRATION, model_path=str(moe_dir), save_path=str(out), overwrite=True, **keys)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "replaceme_jax.cli", "experts", "--config", str(path)], check=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "experts_report.json").read_text())
    return {"config": keys, "path": str(out), "experts": report["num_experts_after"],
            "wall_time_s": round(wall, 1), "stage_seconds": report["wall_time_s"],
            "peak_rss_mb": max(report["peak_rss_mb_after_stage"].values()),
            "calibration_tokens": report["calibration_tokens"], "calibration_sources": report["calibration_sources"],
            "reconstruction_error_mean": sum(e["reconstruction_error"] for e in report["layers"]) / len(report["layers"])}


def evaluate(source: str, limit: int, windows: int, batch_size: int) -> dict:
    from replaceme_jax.conversion import load_model, load_tokenizer
    from replaceme_jax.evaluation import load_task, run_task

    model = load_model(source)
    tokenizer = load_tokenizer(model)
    results = {}
    for name in TASKS:
        task = load_task(name, DATA / "eval", windows if name == "wikitext2" else limit)
        start = time.perf_counter()
        result = run_task(model.params, model.config, tokenizer, task, max_length=1024, batch_size=batch_size)
        results[name] = dict(result.metrics, seconds=round(time.perf_counter() - start, 1))
        logging.info("%s %s: %s", source, name, results[name])
    return results


def markdown(table: dict) -> str:
    rows = ["| model | experts / layer | mean layer reconstruction error | WikiText-2 ppl | ARC-E | HellaSwag "
            "| compress wall s | peak RSS GiB |", "|---|---|---|---|---|---|---|---|"]
    for name, e in table.items():
        r = e["results"]
        rss = f"{e['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in e else "-"
        error = f"{e['reconstruction_error_mean']:.4f}" if "reconstruction_error_mean" in e else "-"
        rows.append(f"| {name} | {e.get('experts', '-')} | {error} | {r['wikitext2']['perplexity']:.2f} | "
                    f"{r['arc_easy']['acc_norm']:.3f} | {r['hellaswag']['acc_norm']:.3f} | "
                    f"{e.get('wall_time_s', '-')} | {rss} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", required=True, help="the MoEfied model directory")
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--work", default="/tmp/moe_bench", help="where compressed models are written")
    parser.add_argument("--rows", default="all", help="comma list of dense, moe and variant names")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "moe_smollm2.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table from --output and exit")
    parser.add_argument("--remeasure", action="store_true",
                        help="re-run the compressions of rows already in --output for their time and memory only "
                             "(the kept experts must come out the same; the evaluation is kept)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    out_path = Path(args.output)
    table = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.markdown:
        print(markdown(table))
        return 0

    moe_dir, work = Path(args.moe), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    moe_config = json.loads((moe_dir / "config.json").read_text())
    num_experts = moe_config.get("num_local_experts") or moe_config["num_experts"]
    plan = {"dense": None, "moe": None, **variants(num_experts)}
    names = list(plan) if args.rows == "all" else args.rows.split(",")
    dense_rows = ROOT / "bench" / "results" / "replaceme_smollm2.json"
    for name in names:
        if name in table and args.remeasure and name in plan and plan[name] is not None:
            old_recipe = json.loads(Path(table[name]["path"], "experts_recipe.json").read_text())
            fresh = compress(name, plan[name], moe_dir, work)
            new_recipe = json.loads(Path(fresh["path"], "experts_recipe.json").read_text())
            if [lay.get("kept") for lay in old_recipe["layers"]] != [lay.get("kept") for lay in new_recipe["layers"]]:
                raise SystemExit(f"{name}: the re-run kept other experts")
            table[name].update({k: fresh[k] for k in ("wall_time_s", "stage_seconds", "peak_rss_mb",
                                                      "reconstruction_error_mean")},
                               remeasured=time.strftime("%Y-%m-%d"))
            out_path.write_text(json.dumps(table, indent=2))
            continue
        if name in table:
            logging.info("%s: already in %s", name, out_path)
            continue
        if name == "dense" and (args.windows, args.limit, args.dense) == (40, 500, "smollm2-135m") and dense_rows.exists():
            # the very same tasks, windows and items were measured for the ReplaceMe table
            original = json.loads(dense_rows.read_text())["original"]["results"]
            table[name] = {"experts": "dense", "results": {t: original[t] for t in TASKS},
                           "measured_in": str(dense_rows.relative_to(ROOT))}
            continue
        if name == "dense":
            entry, source = {"experts": "dense"}, args.dense
        elif name == "moe":
            entry, source = {"experts": num_experts}, str(moe_dir)
        else:
            entry = compress(name, plan[name], moe_dir, work)
            source = entry["path"]
        entry["results"] = evaluate(source, args.limit, args.windows, args.batch_size)
        entry["date"] = time.strftime("%Y-%m-%d")
        table[name] = entry
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(table, indent=2))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
