"""The ``experts`` command: calibration data -> per-layer statistics -> prune or merge -> export.

Layers are processed in order. Each layer's statistics come from one pass over the calibration
batches; the layer is compressed; the residual streams then move on through the original layer
(non-sequential) or the compressed one (sequential, REAM's default), so only one layer's
activations are on the device at a time; between layers the streams wait on disk (``calibrate``), so
memory does not grow with the calibration tokens. Writes an HF directory with ``experts_report.json`` and
``experts_recipe.json`` (kept experts, groups and every saliency per layer, reusable at other ratios).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax.conversion import LoadedModel, export_hf, load_model, load_tokenizer
from replaceme_jax.conversion.export import check_output_location, exported_bytes
from replaceme_jax.conversion.model_io import check_finite, check_model_source
from replaceme_jax import __version__
from replaceme_jax.config import to_dict
from replaceme_jax.data import calibration_batches, check_sources
from replaceme_jax.errors import OutputExistsError, ReplaceMeError, UsageError
from replaceme_jax.experts.calibrate import LayerwiseCalibration
from replaceme_jax.experts.config import ExpertsConfig
from replaceme_jax.experts.merge import ReamOptions, expert_distances, ream_layer, sample_statistics
from replaceme_jax.experts.prune import apply_layer_params, num_experts_to_keep, prune_mlp, select_experts
from replaceme_jax.experts.stats import SALIENCY_METHODS, logit_cosine, reconstruction_error, saliency
from replaceme_jax.models.moe import MoeConfig
from replaceme_jax.progress import progress_bar
from replaceme_jax.report import StageTimer, plot_saliency_heatmap, write_json
from replaceme_jax.sharding import check_batch_divides, check_replication, make_mesh, place_fn

log = logging.getLogger(__name__)

RECIPE_FORMAT = "replaceme_jax.experts_recipe/1"


@dataclasses.dataclass
class ExpertsResult:
    model: LoadedModel  # the compressed model
    report: dict
    recipe: dict
    save_path: Path


def _compress_layer(cfg: ExpertsConfig, config: MoeConfig, layer: dict, stats, sample, num_keep: int,
                    timer: StageTimer) -> tuple[dict, dict]:
    """The layer's new MoE params and its recipe entry."""
    scores = {m: saliency(stats, m) for m in SALIENCY_METHODS}
    entry = {"saliency": {m: s.tolist() for m, s in scores.items()}}
    if cfg.method != "ream":
        keep = select_experts(scores[cfg.method], num_keep)
        entry["kept"] = keep.tolist()
        return prune_mlp(layer["mlp"], keep), entry
    options = ReamOptions(group_size=cfg.group_size, router_similarity=cfg.router_similarity,
                          output_similarity=cfg.output_similarity, alignment=cfg.alignment, pca_dim=cfg.pca_dim,
                          seed=cfg.seed)
    x_sample = jnp.asarray(sample)
    with timer("similarity"):
        distances = expert_distances(logit_cosine(stats), sample_statistics(layer["mlp"], x_sample), options)
    with timer("merge"):
        mlp, merged = ream_layer(layer["mlp"], config, scores[cfg.saliency], distances, x_sample, num_keep, options)
    entry.update(kept=[g[0] for g in merged.groups], groups=merged.groups, weights=merged.weights,
                 dropped=merged.dropped)
    return mlp, entry


def recipe_saliency(path: str, config: MoeConfig, method: str) -> list[np.ndarray]:
    """Per-layer ``method`` saliency from an earlier run's recipe file, checked against the model."""
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read recipe ({e})") from None
    if recipe.get("format") != RECIPE_FORMAT:
        raise UsageError(f"{path}: not an experts recipe (format {recipe.get('format')!r})")
    layers = recipe["layers"]
    if (recipe["model_type"], recipe["num_experts_before"], len(layers)) != (
            config.model_type, config.num_experts, config.num_hidden_layers):
        raise UsageError(f"{path}: recipe is for a {recipe['model_type']} model with {len(layers)} layers of "
                         f"{recipe['num_experts_before']} experts, not this one")
    if any(method not in layer["saliency"] for layer in layers):
        raise UsageError(f"{path}: recipe has no {method} saliency")
    return [np.asarray(layer["saliency"][method], np.float64) for layer in layers]


def _prune_from_recipe(cfg: ExpertsConfig, model: LoadedModel, num_keep: int):
    scores = recipe_saliency(cfg.recipe_path, model.config, cfg.method)
    mlps, entries = [], []
    for layer, saliency_of_layer in zip(model.params["layers"], scores):
        keep = select_experts(saliency_of_layer, num_keep)
        mlps.append(prune_mlp(layer["mlp"], keep))
        entries.append({"saliency": {cfg.method: saliency_of_layer.tolist()}, "kept": keep.tolist()})
    return mlps, entries


def _calibrate_and_compress(cfg: ExpertsConfig, model: LoadedModel, num_keep: int, timer: StageTimer, mesh=None):
    config = model.config
    tokenizer = load_tokenizer(model)
    with timer("calibration_data"):
        batches = calibration_batches(cfg, tokenizer, params=model.params, config=config)
    if batches.num_tokens < 1:
        raise ReplaceMeError("too little calibration data: no token")
    log.info("calibration: %d sequences, %d tokens, %d batches, shapes %s", batches.num_sequences,
             batches.num_tokens, len(batches), batches.shapes)
    # A token sample is kept for every method: REAM aligns and compares experts on it, and every
    # method's per-layer reconstruction error is measured on it.
    run = LayerwiseCalibration(model.params, config, [(b.input_ids, b.attention_mask) for b in batches],
                               dispatch=cfg.dispatch, sample_tokens=cfg.sample_tokens, seed=cfg.seed,
                               mesh=mesh if mesh is not None and mesh.size > 1 else None)
    try:
        mlps, entries = [], []
        num_layers = config.num_hidden_layers
        with progress_bar(num_layers, f"{cfg.method} layers", unit="layer") as bar:
            for index, layer in enumerate(model.params["layers"]):
                with timer("statistics"):
                    stats, sample, outputs = run.statistics(layer, want_sample=True)
                mlp, entry = _compress_layer(cfg, config, layer, stats, sample, num_keep, timer)
                entry["tokens"] = int(stats.tokens)
                if sample is not None:
                    with timer("reconstruction_error"):
                        entry["reconstruction_error"] = reconstruction_error(layer["mlp"], mlp, config,
                                                                             jnp.asarray(sample))
                mlps.append(mlp)
                entries.append(entry)
                if index + 1 < num_layers:
                    if cfg.is_sequential and num_keep < config.num_experts:
                        with timer("recompute"):
                            run.advance(dict(layer, mlp=mlp))
                    else:
                        run.advance(outputs=outputs)
                bar.update(1)
    finally:
        run.close()  # the spilled residual streams
    return mlps, entries, batches, run


def compress_experts(cfg: ExpertsConfig) -> ExpertsResult:
    """Run the whole pipeline for ``cfg`` and write ``cfg.save_path``."""
    timer = StageTimer()
    save_path = Path(cfg.save_path)
    if save_path.exists() and any(save_path.iterdir()) and not cfg.overwrite:
        raise OutputExistsError(save_path)
    check_output_location(save_path, 0)
    if not cfg.recipe_path:
        check_sources(cfg.dataset)
    check_model_source(cfg.model_path)
    mesh = make_mesh(cfg.mesh)
    if not cfg.recipe_path:
        check_batch_divides(cfg.batch_size, mesh)
    with timer("load_model"):
        if mesh.size > 1:
            # tensors go straight into their shards (see compress)
            model = load_model(cfg.model_path, dtype=cfg.dtype, place=place_fn(mesh))
            check_replication(model.family.param_specs(model.config), mesh)
        else:
            model = load_model(cfg.model_path, dtype=cfg.dtype)
        check_finite(model.params, cfg.model_path)
    config = model.config
    if not isinstance(config, MoeConfig):
        raise UsageError(f"{cfg.model_path}: {config.model_type} is not a mixture-of-experts model")
    num_keep = num_experts_to_keep(config, cfg.num_experts, cfg.compression_ratio)
    # the original's size bounds the compressed model's
    check_output_location(save_path, exported_bytes(model.params, cfg.save_dtype or model.source_dtype))
    if cfg.recipe_path:
        mlps, entries = _prune_from_recipe(cfg, model, num_keep)
        batches = run = None
    else:
        mlps, entries, batches, run = _calibrate_and_compress(cfg, model, num_keep, timer, mesh)
    params, new_config = apply_layer_params(model.params, config, mlps)
    check_finite(params, "compressed model")
    compressed = dataclasses.replace(model, params=params, config=new_config)

    recipe = {
        "format": RECIPE_FORMAT,
        "method": cfg.method,
        "saliency": cfg.method if cfg.method != "ream" else cfg.saliency,
        "model_path": cfg.model_path,
        "model_type": config.model_type,
        "num_experts_before": config.num_experts,
        "num_experts_after": new_config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "layers": entries,
    }
    report = {
        "tool": f"replaceme_jax {__version__}",
        "method": cfg.method,
        "model_path": cfg.model_path,
        "model_type": config.model_type,
        "num_experts_before": config.num_experts,
        "num_experts_after": new_config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "sequential": cfg.is_sequential,
        "recipe_path": cfg.recipe_path,
        "calibration_tokens": batches.num_tokens if batches is not None else 0,
        "calibration_sequences": batches.num_sequences if batches is not None else 0,
        "calibration_sources": list(batches.sources) if batches is not None else [],
        "calibration_batch_shapes": [list(s) for s in batches.shapes] if batches is not None else [],
        "sample_tokens": sum(map(len, run.sample_index)) if run is not None and run.sample_index else 0,
        "layers": [{k: v for k, v in e.items() if k in ("kept", "groups", "dropped", "tokens", "reconstruction_error")}
                   for e in entries],
        "wall_time_s": timer.seconds,
        "peak_rss_mb_after_stage": timer.peak_rss_mb,
        "config": to_dict(cfg),
        "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                     "mesh": dict(mesh.shape), "python": platform.python_version()},
    }

    def write_extra(tmp: Path) -> None:
        write_json(tmp / "experts_recipe.json", recipe)
        write_json(tmp / "experts_report.json", report)
        shown = recipe["saliency"]
        if all(shown in e["saliency"] for e in entries):
            plot_saliency_heatmap(tmp / "experts_saliency.png", [e["saliency"][shown] for e in entries],
                                  [e.get("kept", []) for e in entries],
                                  title=f"{shown} saliency per expert and layer (dots: kept)")

    with timer("export"):
        export_hf(compressed, save_path, dtype=cfg.save_dtype, overwrite=cfg.overwrite, write_extra=write_extra)
    return ExpertsResult(model=compressed, report=report, recipe=recipe, save_path=save_path)
