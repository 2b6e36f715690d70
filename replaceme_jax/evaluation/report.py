"""Runs over saved models and their report: ``run_evaluation`` (the ``evaluate`` command), the markdown
tables and the bar chart."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.evaluation.generation import greedy_continuations
from replaceme_jax.evaluation.metrics import TaskResult, paired_difference
from replaceme_jax.evaluation.scoring import Reference, check_bos, scoring_bos_id
from replaceme_jax.evaluation.tasks import TASK_HELP, load_task, parse_limits, parse_task_list, read_prompts, run_task
from replaceme_jax.sharding import check_replication, make_mesh, place_fn

log = logging.getLogger(__name__)


def _model_name(src: str, taken: dict) -> str:
    path = Path(src)
    name = (path.stem if path.is_file() else path.resolve().name if path.exists() else src) or src
    base, k = name, 2
    while name in taken:
        name, k = f"{base} ({k})", k + 1
    return name


def run_evaluation(models: Sequence[str], tasks: str | Sequence[str] = (), *, data_dir: str | Path | None = None,
                   limit: int | str | dict | None = None, max_length: int = 1024, batch_size: int = 8,
                   output: str | Path | None = None, progress: bool = True, generate: str | Path | None = None,
                   max_new_tokens: int = 32, reference: str | Path | None = None,
                   mesh: Mapping[str, int] | None = None, bos: str | bool = "auto") -> dict:
    """Evaluate each model on each task, and greedily continue each prompt of ``generate`` (a file, one
    prompt a line) with each model; write the JSON report (and a bar chart beside it) if asked.

    ``limit``: see ``parse_limits`` (one number for every task, or per task). Task files and prompts are
    read and checked before any model is loaded, so a typo fails fast.

    ``reference``: a model (same vocabulary) that every model is compared with on every scoring task:
    ``kl`` and ``top1_agreement`` on the task's scored tokens (``metrics``). It stays loaded beside each
    model in turn (both models' weights in memory; a model given by the same path is not loaded again);
    a model whose vocabulary differs is refused when it is loaded, before it is scored.

    ``mesh``: axis sizes as the ``mesh`` config key of ``compress`` (``{"data": 4, "tensor": 2}``;
    ``sharding.make_mesh``). Each model (and the reference) is loaded straight into its shards and
    every scoring batch is split over ``data x fsdp`` (``scoring``); the figures are the single
    device's up to the order of float32 sums. Default: one device.

    ``bos``: put the tokenizer's BOS in front of every scored sequence: ``auto`` (default) for the
    model types lm-evaluation-harness gives one (Gemma, which is trained with it), ``True``/``False``
    always/never (``scoring_bos_id``). Each model's entry says whether it got one (``bos``).

    Each model's entry keeps every item's 0/1 outcome per accuracy (``outcomes[task][metric]``, in
    the task file's order), and every model after the first gets ``paired[task][metric]``: its
    accuracy minus the first model's on the same items, with the standard error of that paired
    difference (``paired_difference``; ``paired_table`` prints them).
    """
    from replaceme_jax.conversion import load_model, load_tokenizer

    if not models:
        raise UsageError("no model given")
    if max_length < 2 or batch_size < 1:
        raise UsageError(f"--max-length must be >= 2 and --batch-size >= 1 (got {max_length}, {batch_size})")
    check_bos(bos)  # before any model is loaded
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    has_tasks = bool(tasks.strip()) if isinstance(tasks, str) else bool(tasks)
    if not has_tasks and generate is None:
        raise UsageError(f"nothing to evaluate: give --tasks ({TASK_HELP}), --generate FILE, or both")
    names = parse_task_list(tasks) if has_tasks else []
    limits = parse_limits(limit, names)
    loaded_tasks = [load_task(name, data_dir, limits[name]) for name in names]
    prompts = read_prompts(generate) if generate is not None else []
    from replaceme_jax.conversion.model_io import check_model_source

    reference = str(reference) if reference is not None else None
    device_mesh = make_mesh(mesh) if mesh is not None else None
    if device_mesh is not None and device_mesh.size == 1:
        device_mesh = None
    for src in [*models, reference] if reference is not None else models:
        check_model_source(src)  # a bad second model fails now, not after the first one is scored
    settings = {"tasks": [t.name for t in loaded_tasks], "files": {t.name: str(t.path) for t in loaded_tasks},
                "limit": limit, "limits": limits, "max_length": max_length, "batch_size": batch_size,
                "backend": jax.default_backend(), "bos": bos,
                "mesh": dict(device_mesh.shape) if device_mesh is not None else None}
    if generate is not None:
        settings.update(generate=str(generate), max_new_tokens=max_new_tokens)
    if reference is not None:
        settings["reference"] = reference
    report = {"settings": settings, "models": {}}
    continuations = []  # per model, in the order of `models`
    reference_model = _load(load_model, reference, device_mesh) if reference is not None else None
    for src in models:
        same = reference is not None and _same_source(src, reference)
        model = reference_model if same else _load(load_model, src, device_mesh)
        tokenizer = load_tokenizer(model)
        config = model.config
        compare = None
        if reference_model is not None:
            if config.vocab_size != reference_model.config.vocab_size:
                raise ReplaceMeError(f"{src}: a vocabulary of {config.vocab_size} tokens, the reference {reference} "
                                     f"has {reference_model.config.vocab_size}: --reference needs the same tokenizer")
            compare = Reference(reference_model.params, reference_model.config)
        if max_length > config.max_position_embeddings:
            log.warning("%s: --max-length %d exceeds max_position_embeddings %d", src, max_length,
                        config.max_position_embeddings)
        bos_id = scoring_bos_id(config, tokenizer, bos)
        entry = {"path": str(src), "num_hidden_layers": config.num_hidden_layers, "bos": bos_id is not None,
                 "results": {}, "timing": {}}
        first = next(iter(report["models"].values()), None)
        for task in loaded_tasks:
            result = run_task(model.params, config, tokenizer, task, max_length=max_length, batch_size=batch_size,
                              progress=progress, reference=compare, bos_id=bos_id)
            entry["results"][task.name] = result.metrics
            entry["timing"][task.name] = timing = result.timing()
            if result.generations is not None:
                entry.setdefault("outputs", {})[task.name] = result.generations.texts
            outcomes = result.outcome_lists()
            if outcomes:
                entry.setdefault("outcomes", {})[task.name] = outcomes
                if first is not None:
                    entry.setdefault("paired", {})[task.name] = {
                        metric: paired_difference(first["outcomes"][task.name][metric], v)
                        for metric, v in outcomes.items()}
            log.info("%s %s: %s (%.1f s, %.0f tokens/s)", src, task.name,
                     ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if v is not None), timing["seconds"],
                     timing["tokens_per_second"])
        if prompts:
            generations = greedy_continuations(model.params, config, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               progress=progress, desc="generate")
            continuations.append(generations.texts)
            entry["timing"]["generate"] = TaskResult({}, None, generations).timing()
            log.info("%s: %d greedy continuations (%.1f s)", src, len(prompts), generations.seconds)
        report["models"][_model_name(str(src), report["models"])] = entry
        del model, tokenizer
    if prompts:
        names_by_order = list(report["models"])
        report["generation"] = {"file": str(generate), "max_new_tokens": max_new_tokens, "items": [
            {"prompt": prompt, "continuations": {name: texts[i] for name, texts in zip(names_by_order, continuations)}}
            for i, prompt in enumerate(prompts)]}
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        if _rows(report):
            plot_report(report, output.with_suffix(".png"))
    return report


STDERR = "_stderr"  # results[metric + STDERR]: the metric's standard error (accuracies)


def _load(load_model, src: str, mesh=None):
    """The model, on one device or (``mesh``) with each tensor put straight into its shards."""
    start = time.perf_counter()
    if mesh is None:
        model = load_model(src)
    else:
        model = load_model(src, place=place_fn(mesh))
        check_replication(model.family.param_specs(model.config), mesh)
    log.info("loaded %s (%d layers) in %.1f s", src, model.config.num_hidden_layers, time.perf_counter() - start)
    return model


def _same_source(a: str, b: str) -> bool:
    """The same checkpoint: the same path once resolved, or the same built-in name."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def _rows(report: dict) -> list[tuple[str, str, int]]:
    """(task, metric, n) in task order, metrics as the first model reports them (standard errors go
    with their metric, not on rows of their own)."""
    first = next(iter(report["models"].values()))["results"]
    return [(task, metric, values.get("n")) for task, values in first.items() for metric in values
            if metric != "n" and not metric.endswith(STDERR)]


def markdown_table(report: dict) -> str:
    """Models side by side, accuracies as ``value ± standard error``; every model after the first also
    shows its score as % of the first's. Empty when the report has no task results (``generation_table``
    shows continuations)."""
    if not _rows(report):
        return ""
    names = list(report["models"])
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for task, metric, n in _rows(report):
        base = report["models"][names[0]]["results"][task][metric]
        cells = []
        for name in names:
            results = report["models"][name]["results"].get(task, {})
            value, stderr = results.get(metric), results.get(metric + STDERR)
            if value is None:
                cells.append("-")
                continue
            cell = f"{value:.2f}" if metric == "perplexity" else f"{value:.4f}"
            if stderr is not None:
                cell += f" ± {stderr:.4f}"
            if name != names[0]:
                # a divergence is no fraction of the first model's (which is ~0 against itself)
                cell += f" ({100 * value / base:.1f}%)" if base and metric != "kl" else ""
            cells.append(cell)
        lines.append(f"| {task} (n={n}) | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(report: dict) -> str:
    """Every model after the first against the first, item by item: each accuracy's difference ±
    the standard error of the paired difference. Empty with fewer than two models or no accuracies."""
    names = list(report["models"])
    rows = [(task, metric, n) for task, metric, n in _rows(report)
            if metric in report["models"][names[-1]].get("paired", {}).get(task, {})]
    if len(names) < 2 or not rows:
        return ""
    lines = [f"paired against {names[0]} on the same items (difference ± its standard error):", "",
             "| task | metric | " + " | ".join(names[1:]) + " |", "|---|---|" + "---:|" * (len(names) - 1)]
    for task, metric, n in rows:
        cells = []
        for name in names[1:]:
            paired = report["models"][name].get("paired", {}).get(task, {}).get(metric)
            if paired is None:
                cells.append("-")
                continue
            stderr = paired["stderr"]
            cells.append(f"{paired['difference']:+.4f}" + ("" if stderr is None else f" ± {stderr:.4f}"))
        lines.append(f"| {task} (n={n}) | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> Path:
    """Grouped bars, one per model: accuracies and top-1 agreement (with standard-error whiskers), then
    perplexities, then KL to the reference, each panel present when the report has such metrics."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["models"])
    rows = _rows(report)
    groups = [("accuracy", [r for r in rows if r[1] not in ("perplexity", "kl")]),
              ("perplexity (lower is better)", [r for r in rows if r[1] == "perplexity"]),
              ("KL(reference || model), nats", [r for r in rows if r[1] == "kl"])]
    groups = [g for g in groups if g[1]]
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) * max(1, len(names)) / 2 + 3), 4.5))
    FigureCanvasAgg(fig)  # Agg on a standalone figure: no pyplot, no global backend switch
    width = 0.8 / len(names)
    for index, (title, group) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), index + 1)
        x = np.arange(len(group))
        for k, name in enumerate(names):
            results = report["models"][name]["results"]
            heights = [results.get(task, {}).get(metric, np.nan) for task, metric, _ in group]
            errors = [results.get(task, {}).get(metric + STDERR) for task, metric, _ in group]
            errors = [np.nan if e is None else e for e in errors]
            ax.bar(x + (k - (len(names) - 1) / 2) * width, heights, width, label=name,
                   yerr=None if np.all(np.isnan(errors)) else errors, capsize=2)
        ax.set_xticks(x, [f"{task}\n{metric}" for task, metric, _ in group], fontsize=8)
        if title.startswith("perplexity"):
            ax.set_yscale("log")  # a pruned model can be 10^4 times the original: every bar stays visible
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def markdown_cell(text: str) -> str:
    """``text`` on one markdown table line: newlines shown as ``\\n``, pipes escaped."""
    return text.replace("\r", "").replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")


def generation_table(report: dict) -> str:
    """Prompts down, models across: every model's greedy continuation of every prompt."""
    names = list(report["models"])
    lines = ["| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for item in report["generation"]["items"]:
        cells = [markdown_cell(item["prompt"])] + [markdown_cell(item["continuations"].get(n, "-")) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
