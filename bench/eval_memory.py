"""Peak memory of `evaluate --tasks wikitext2` at a 150k vocabulary: full logits (before issue 17) against
the streamed log-softmax (after), each setting in its own process.

    .venv/bin/python bench/eval_memory.py [--vocab 49152,151936] [--modes imports,forward,before,after]
                                          [--limit 8] [--max-length 1024] [--batch-size 8]
                                          [--check-tasks arc_easy,lambada_openai] [--check-limit 50,arc_easy=100]
                                          [--check-rounds 1] [--output bench/results/eval_memory.json]

Models (built once, cached under ~/.cache/replaceme_jax/bench/): SmolLM2-135M from its GGUF, exported as
a float32 HF directory with its own 49,152-token vocabulary, and the same model with the (tied)
embedding grown to 151,936 rows (Qwen2's vocabulary size) with random rows (seed 0, 5% of the real rows'
standard deviation, so that the tokenizer's tokens still carry most of the probability and the
perplexity stays meaningful), so the softmax runs over a 150k vocabulary as in the issue's 0.5B model.

Modes, each one `python bench/eval_memory.py --worker MODE --model DIR ...` (peak RSS = the worker's
`ru_maxrss`):
- imports: the packages `evaluate` imports, no model (the runtime floor);
- forward: load the model and run one jitted forward pass without the LM head on one batch of the same
  WikiText-2 windows (the model plus one batch of activations);
- before: `run_evaluation(..., ["wikitext2"])` with the pre-issue-17 scoring function (full
  ``[batch, length, vocab]`` float32 logits; reimplemented verbatim below and patched in);
- after: the same with the current scoring function;
- transformers: `AutoModelForCausalLM` float32 on the same windows and batches (logits, log_softmax).

Then `--check-tasks` compares the two scoring paths in one process on each model: per-request
log-likelihoods, perplexity and accuracies, and their times (`--check-rounds 2`: alternated, the second
round kept, so that both are compiled and share the machine's load alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("REPLACEME_JAX_CACHE", Path.home() / ".cache" / "replaceme_jax")) / "bench"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak resident set since it started or since ``reset_peak`` (VmHWM). Not
    ``ru_maxrss``: Linux carries that over from the parent through fork and exec, so a worker would
    report the parent's peak if it was higher."""
    return _status("VmHWM")


def rss_bytes() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), to measure one phase."""
    Path("/proc/self/clear_refs").write_text("5")


class Phases:
    """Peak RSS per phase: ``mark(name)`` closes the running phase (its peak and the RSS at its end)."""

    def __init__(self):
        self.record, self.overall = {}, 0

    def mark(self, name: str) -> None:
        peak = peak_rss_bytes()
        self.overall = max(self.overall, peak)
        self.record[name] = {"peak_rss_bytes": peak, "rss_at_end_bytes": rss_bytes()}
        reset_peak()


# ---------------------------------------------------------------------------------------------
# The scoring function before issue 17 (replaceme_jax/evaluate.py at 97636c1), verbatim but for the
# unused `vocab_chunk` argument that the current caller passes.


def full_logits_score_batch():
    import jax
    import jax.numpy as jnp

    from replaceme_jax.models import family_for

    @functools.partial(jax.jit, static_argnames=("config", "vocab_chunk"))
    def _score_batch(params, input_ids, attention_mask, targets, target_mask, *, config, vocab_chunk=None):
        logits = family_for(config.model_type).forward(params, config, input_ids, attention_mask).logits
        logits = logits.astype(jnp.float32)
        top = jnp.max(logits, axis=-1)
        log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        logprob = jnp.sum(jnp.where(target_mask, picked - log_z, 0.0), axis=-1)
        greedy = jnp.all((picked >= top) | ~target_mask, axis=-1)
        return logprob, greedy

    return _score_batch


# ---------------------------------------------------------------------------------------------
# Models


def build_models(vocab_sizes: list[int]) -> dict[int, Path]:
    """HF float32 directories of SmolLM2-135M at each vocabulary size (built once)."""
    out = {}
    for vocab in vocab_sizes:
        path = CACHE / f"smollm2-135m-v{vocab}"
        if not (path / "config.json").is_file():
            build_model(vocab, path)
        out[vocab] = path
    return out


def build_model(vocab: int, path: Path) -> None:
    import jax.numpy as jnp
    import numpy as np

    from replaceme_jax.conversion import export_hf, load_model

    model = load_model("smollm2-135m")
    table = np.asarray(model.params["embed_tokens"]["embedding"])
    if vocab < table.shape[0]:
        raise SystemExit(f"--vocab {vocab} is smaller than SmolLM2's {table.shape[0]}")
    if vocab > table.shape[0]:
        assert model.config.tie_word_embeddings
        extra = np.random.default_rng(0).normal(0.0, 0.05 * table.std(), (vocab - table.shape[0], table.shape[1]))
        model.params["embed_tokens"]["embedding"] = jnp.asarray(np.concatenate([table, extra.astype(table.dtype)]))
        model.config = dataclasses.replace(model.config, vocab_size=vocab)
        model.hf_config = dict(model.hf_config, vocab_size=vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_hf(model, path, dtype="float32", overwrite=True)


# ---------------------------------------------------------------------------------------------
# Workers (one process each)


def worker(args) -> dict:
    began = time.perf_counter()
    import jax
    import numpy as np

    import replaceme_jax.evaluation as ev
    from replaceme_jax.conversion import load_model, load_tokenizer
    from replaceme_jax.evaluation import report, scoring

    result = {"mode": args.worker, "model": str(args.model)}
    phases = Phases()
    if args.worker == "imports":
        pass
    elif args.worker in ("before", "after"):
        if args.worker == "before":
            scoring._score_batch = full_logits_score_batch()
        run_task = report.run_task

        def phased_run_task(*a, **k):  # the load phase ends where scoring starts
            phases.mark("load")
            return run_task(*a, **k)

        report.run_task = phased_run_task  # what run_evaluation calls
        report = ev.run_evaluation([str(args.model)], ["wikitext2"], limit=args.limit, max_length=args.max_length,
                                   batch_size=args.batch_size, progress=False)
        phases.mark("score")
        entry = next(iter(report["models"].values()))
        result.update(perplexity=entry["results"]["wikitext2"]["perplexity"],
                      n=entry["results"]["wikitext2"]["n"], scoring=entry["timing"]["wikitext2"])
    elif args.worker == "forward":
        from replaceme_jax.models import family_for

        model = load_model(str(args.model))
        tokenizer = load_tokenizer(model)
        task = ev.load_task("wikitext2", limit=args.limit)
        windows = ev.perplexity_windows(ev.encode(tokenizer, [task.text])[0], args.max_length)[:args.batch_size]
        ids = np.zeros((args.batch_size, args.max_length), np.int32)
        for row, w in enumerate(windows):
            ids[row, :len(w) - 1] = w[:-1]
        mask = (np.arange(args.max_length)[None] < np.array([len(w) - 1 for w in windows])[:, None]).astype(np.int32)
        family = family_for(model.config.model_type)

        @jax.jit
        def hidden(params, ids, mask):
            return family.forward(params, model.config, ids, mask, compute_logits=False).hidden_states[-1].sum()

        phases.mark("load")
        t0 = time.perf_counter()
        float(hidden(model.params, ids, mask))
        result["forward_seconds"] = round(time.perf_counter() - t0, 2)
        phases.mark("forward")
        result["param_bytes"] = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params)))
    elif args.worker == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        model = load_model(str(args.model))  # only for the tokenizer, then dropped
        tokenizer = load_tokenizer(model)
        del model
        task = ev.load_task("wikitext2", limit=args.limit)
        windows = ev.perplexity_windows(ev.encode(tokenizer, [task.text])[0], args.max_length)[:args.limit]
        reference = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
        phases.mark("load")
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for first in range(0, len(windows), args.batch_size):
                batch = torch.tensor(np.stack(windows[first:first + args.batch_size]), dtype=torch.long)
                logits = reference(input_ids=batch[:, :-1]).logits.float()
                logprobs = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])
                nll -= float(logprobs.double().sum())
                count += logprobs.numel()
        result.update(perplexity=float(np.exp(nll / count)), n=len(windows),
                      scoring={"seconds": round(time.perf_counter() - t0, 2)})
        phases.mark("score")
    else:
        raise SystemExit(f"unknown worker mode {args.worker}")
    phases.mark("end")
    result["wall_seconds"] = round(time.perf_counter() - began, 2)
    result["peak_rss_bytes"] = phases.overall
    result["phases"] = phases.record
    return result


def check(model_dir: Path, tasks: list[str], limit: str, max_length: int, batch_size: int, rounds: int = 1) -> dict:
    """Both scoring paths on the same requests, in one process: largest log-likelihood differences,
    metrics and times. With ``rounds`` > 1 the paths alternate (before, after, before, ...) and the
    times of the last round are kept: both compiled, the machine's load shared alike."""
    import numpy as np

    import replaceme_jax.evaluation as ev
    from replaceme_jax.conversion import load_model, load_tokenizer
    from replaceme_jax.evaluation import scoring

    model = load_model(str(model_dir))
    tokenizer = load_tokenizer(model)
    chunked, full = scoring._score_batch, full_logits_score_batch()
    limits = ev.parse_limits(limit, tasks)
    out = {}
    for name in tasks:
        task = ev.load_task(name, limit=limits[name])
        runs = {}
        for _ in range(rounds):
            for label, fn in (("before", full), ("after", chunked)):
                scoring._score_batch = fn  # what score_requests calls
                runs[label] = ev.run_task(model.params, model.config, tokenizer, task, max_length=max_length,
                                          batch_size=batch_size)
        scoring._score_batch = chunked
        a, b = runs["before"].scores, runs["after"].scores
        diff = np.abs(a.logprob - b.logprob)
        out[name] = {
            "requests": int(len(a.logprob)),
            "max_abs_logprob_diff": float(diff.max()),
            "max_rel_logprob_diff": float((diff / np.maximum(np.abs(a.logprob), 1e-30)).max()),
            "greedy_equal": bool((a.greedy == b.greedy).all()),
            "metrics_before": runs["before"].metrics, "metrics_after": runs["after"].metrics,
            "seconds_before": round(a.seconds, 1), "seconds_after": round(b.seconds, 1),
            "tokens_per_second_before": round(a.tokens_per_second, 1),
            "tokens_per_second_after": round(b.tokens_per_second, 1),
        }
        print(json.dumps({"model": model_dir.name, "task": name, **out[name]}), flush=True)
    return out


# ---------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    """Markdown: per setting the whole-process peak, the peak after loading (scoring or forward phase)
    against the forward pass's, the RSS once loaded, wall and scoring time, perplexity."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    forward = {r["vocab"]: r for r in rows if r["mode"] == "forward" and "phases" in r}
    lines = ["| vocab | mode | peak RSS (GiB) | RSS loaded (GiB) | peak after load (GiB) | "
             "vs forward-only | wall (s) | scoring (s) | perplexity |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "phases" not in r:
            lines.append(f"| {r['vocab']:,} | {r['mode']} | failed: {r.get('error')} | | | | | | |")
            continue
        ph = r["phases"]
        loaded = gib(ph["load"]["rss_at_end_bytes"]) if "load" in ph else ""
        after = max((v["peak_rss_bytes"] for k, v in ph.items() if k in ("score", "forward")), default=None)
        ref = forward.get(r["vocab"], {}).get("phases", {}).get("forward", {}).get("peak_rss_bytes")
        ratio = f"{after / ref:.2f}x" if after and ref else ""
        scoring = r.get("scoring", {}).get("seconds", r.get("forward_seconds", ""))
        ppl = f"{r['perplexity']:.4f}" if "perplexity" in r else ""
        lines.append(f"| {r['vocab']:,} | {r['mode']} | {gib(r['peak_rss_bytes'])} | {loaded} | "
                     f"{gib(after) if after else ''} | {ratio} | {r['wall_seconds']} | {scoring} | {ppl} |")
    return "\n".join(lines)


def run_worker(mode: str, model: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", str(model), "--limit", str(args.limit),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"mode": mode, "model": str(model), "error": done.stderr.strip().splitlines()[-1:],
                "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", default="49152,151936")
    p.add_argument("--modes", default="imports,forward,before,after")
    p.add_argument("--limit", type=int, default=8, help="WikiText-2 windows (default: one batch of 8)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--check-tasks", default="", help="compare both scoring paths on these tasks (in process)")
    p.add_argument("--check-limit", default="50", help="items per checked task: N or TASK=N,... (as --limit)")
    p.add_argument("--check-rounds", type=int, default=1, help="alternate the two paths this many times")
    p.add_argument("--output", default=None, help="JSON file for every figure")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        build_models([int(v) for v in args.build.split(",")])
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    vocab_sizes = [int(v) for v in args.vocab.split(",")]
    models = {v: CACHE / f"smollm2-135m-v{v}" for v in vocab_sizes}
    if not all((m / "config.json").is_file() for m in models.values()):  # in a child: keep this process small
        subprocess.run([sys.executable, __file__, "--build", args.vocab], check=True, cwd=ROOT)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "python": platform.python_version(), "command": " ".join([Path(sys.executable).name] + sys.argv),
            "limit": args.limit, "max_length": args.max_length, "batch_size": args.batch_size}
    meta["jax"] = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__)"], capture_output=True,
                                 text=True).stdout.strip()
    rows = []
    for vocab, path in models.items():
        for mode in [m for m in args.modes.split(",") if m]:
            row = {"vocab": vocab, **run_worker(mode, path, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    checks = {}
    if args.check_tasks:
        for vocab, path in models.items():
            checks[vocab] = check(path, args.check_tasks.split(","), args.check_limit, args.max_length,
                                  args.batch_size, args.check_rounds)
    print()
    print(table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
