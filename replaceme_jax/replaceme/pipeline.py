"""The ReplaceMe pipeline: calibration data -> distances -> blocks -> T -> merge -> export + report."""

from __future__ import annotations

import dataclasses
import logging
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from replaceme_jax.conversion import LoadedModel, export_hf, load_model, load_tokenizer
from replaceme_jax.conversion.export import check_output_location, exported_bytes
from replaceme_jax.conversion.atomic import atomic_output_dir
from replaceme_jax.conversion.model_io import check_finite
from replaceme_jax import __version__
from replaceme_jax.conversion.assets import resolve_builtin
from replaceme_jax.checkpointing import RunState, model_fingerprint, only_state
from replaceme_jax.capture import CaptureSpec, RowPolicy, collect_rows, run_capture, stats_bytes
from replaceme_jax.config import CompressConfig, to_dict
from replaceme_jax.errors import ReplaceMeError, UsageError
from replaceme_jax.replaceme.merge import replace_block
from replaceme_jax.replaceme.selection import candidate_starts, select_blocks
from replaceme_jax.replaceme.solvers import (NormalEquations, cosine_state, fit_cosine,
                                             lstsq_from_normal_equations)
from replaceme_jax.sharding import (check_batch_divides, gather_to_host, initialize_distributed, is_main_process,
                                    make_mesh, place_fn, shard_params)
from replaceme_jax.data import calibration_batches
from replaceme_jax.report import StageTimer, plot_distances, write_distances_csv, write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockResult:
    start: int  # original numbering
    end: int
    T: np.ndarray | None
    relative_error_with_T: float | None
    relative_error_without_T: float | None
    fit_rows: float
    solver: dict


@dataclasses.dataclass
class CompressResult:
    model: LoadedModel  # the pruned model (params with T merged)
    distances: dict[int, float]
    blocks: list[BlockResult]
    report: dict
    save_path: Path | None


def _progress(total: int, desc: str):
    # multi-host runs show progress on process 0 only
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, disable=None if is_main_process() else True)


def _check_enough_data(cfg: CompressConfig, batches, dim: int) -> None:
    if batches.num_sequences < 1:
        raise ReplaceMeError("too little calibration data: no sequence")
    if cfg.method in ("lstsq", "cosine") and not cfg.diag and cfg.alpha == 0 and batches.num_tokens < dim:
        raise ReplaceMeError(
            f"too little calibration data: {batches.num_tokens} tokens for a {dim}x{dim} transform "
            f"(need at least {dim}, or set alpha > 0)")


def _absolute_alpha(cfg: CompressConfig, equations: NormalEquations) -> float:
    # A relative alpha scales with the activations: a fraction of the mean diagonal of A.
    return cfg.alpha * float(np.mean(np.diag(equations.A))) if cfg.alpha_relative else cfg.alpha


def _solve_block(cfg: CompressConfig, model: LoadedModel, block_now: tuple[int, int], equations: NormalEquations,
                 batches, rows: RowPolicy, timer: StageTimer, mesh=None, checkpoint=None) -> tuple[np.ndarray | None, dict]:
    if cfg.method == "uidl":
        return None, {"method": "uidl"}
    if cfg.method == "lstsq":
        alpha = _absolute_alpha(cfg, equations)
        with timer("solve"):
            T, info = lstsq_from_normal_equations(equations.A, equations.B, alpha, cfg.diag, cfg.ridge_target)
        return T, {"method": "lstsq", "condition_number": info.condition_number, "factorisation": info.method,
                   "alpha": alpha, "ridge_target": cfg.ridge_target, "diag": cfg.diag}
    # cosine: needs the rows themselves, bounded by cosine_max_tokens
    with timer("collect_rows"), _progress(len(batches), "rows for cosine") as bar:
        data = collect_rows(model.params, model.config, block_now, rows, batches, cfg.cosine_max_tokens,
                            seed=cfg.seed, progress=bar, mesh=mesh)
    T0 = None
    if cfg.cosine_init == "lstsq":
        T0, _ = lstsq_from_normal_equations(equations.A, equations.B, _absolute_alpha(cfg, equations), cfg.diag,
                                            cfg.ridge_target)
    target = data["h_end"] if cfg.accurate else data["h_end"] - data["Y"]
    resume = None
    if checkpoint is not None:
        # the template's shapes come from a zero-epoch state of the same problem
        template = cosine_state(np.zeros((model.config.hidden_size,) * 2, np.float32),
                                optax.adam(cfg.cosine_lr).init(jnp.zeros((model.config.hidden_size,) * 2)),
                                jax.random.PRNGKey(0), [0.0], cfg.cosine_epochs)
        restored = checkpoint.restore(template)
        resume = restored[1] if restored is not None else None
    with timer("solve"), tqdm(total=cfg.cosine_epochs, desc="cosine epochs", disable=None) as bar:
        def report(epoch, loss):
            bar.set_postfix(loss=f"{loss:.5f}")
            bar.update(1)
        result = fit_cosine(data["M"], target, data["Y"], accurate=cfg.accurate, loss=cfg.loss, T0=T0,
                            lr=cfg.cosine_lr, epochs=cfg.cosine_epochs, batch_rows=cfg.cosine_batch_rows,
                            seed=cfg.seed, progress=report, resume=resume,
                            on_epoch=(lambda st: checkpoint.save(int(st["epochs_done"][0]), st, force=True))
                            if checkpoint is not None else None)
    return result.T, {"method": "cosine", "loss": cfg.loss, "accurate": cfg.accurate, "init": cfg.cosine_init,
                      "rows_used": int(len(data["M"])), "rows_seen": int(data["seen"]),
                      "losses": result.losses, "lr": cfg.cosine_lr, "epochs": cfg.cosine_epochs}


def _fit_block(cfg, model, current, index, block, block_now, pass1_equations, n, batches, rows, timer, mesh,
               state) -> BlockResult:
    start, end = block
    reuse = start in pass1_equations and end - start == n and (index == 0 or not cfg.sequential)
    if reuse:
        equations = pass1_equations[start]
    else:
        # The earlier blocks are already replaced in `current`: fit on the model as it will be.
        source = current if cfg.sequential else model
        block_src = block_now if cfg.sequential else block
        stats_spec = CaptureSpec(stats_blocks=(block_src,), rows=rows)
        with timer("statistics_pass"), _progress(len(batches), f"statistics {start}-{end}") as bar:
            equations = run_capture(source.params, source.config, stats_spec, batches, progress=bar, mesh=mesh,
                                    checkpoint=state.pass_state(f"stats_{index}") if state else None).equations[0]
    T, solver_info = _solve_block(cfg, current if cfg.sequential else model,
                                  block_now if cfg.sequential else block, equations, batches, rows, timer, mesh,
                                  checkpoint=state.pass_state(f"cosine_{index}") if state else None)
    return BlockResult(start=start, end=end, T=T,
                       relative_error_with_T=equations.relative_error(T) if T is not None else None,
                       relative_error_without_T=equations.relative_error(None), fit_rows=equations.rows,
                       solver=solver_info)


def compress(cfg: CompressConfig, distances_only: bool = False, restart: bool = False) -> CompressResult:
    """Run the whole pipeline for ``cfg``; write ``cfg.save_path`` (unless ``distances_only`` with no path).

    With ``checkpoint_every > 0`` the streaming state is saved under ``save_path/.state`` and a rerun
    resumes from it (``restart`` discards it).
    """
    timer = StageTimer()
    save_path = Path(cfg.save_path) if cfg.save_path else None
    if (save_path is not None and save_path.exists() and not only_state(save_path) and any(save_path.iterdir())
            and not cfg.overwrite):
        raise UsageError(f"{save_path}: output exists and is not empty (set overwrite: true or pass --overwrite)")
    initialize_distributed(cfg.distributed)
    if not is_main_process():
        logging.getLogger("replaceme_jax").setLevel(logging.WARNING)
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg.batch_size, mesh)
    with timer("load_model"):
        if mesh.size > 1:
            # tensors go straight into their shards; orbax restores whole, then is sharded
            model = load_model(cfg.model_path, dtype=cfg.dtype, place=place_fn(mesh))
            model.params = shard_params(model.params, model.family.param_specs(model.config), mesh)
        else:
            model = load_model(cfg.model_path, dtype=cfg.dtype)
        check_finite(model.params, cfg.model_path)
    log.info("mesh %s over %d device(s), %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())
    n = cfg.layers_to_skip
    num_layers = model.config.num_hidden_layers
    starts = candidate_starts(num_layers, n, cfg.min_distance_layer)
    if cfg.num_A > len(starts):
        raise UsageError(f"num_A={cfg.num_A} blocks of {n} layers do not fit in {num_layers} layers")
    if save_path is not None and is_main_process():
        needed = 0 if (distances_only or cfg.save_transform_only) else exported_bytes(
            model.params, cfg.save_dtype or model.source_dtype)
        check_output_location(save_path, needed)
    state = None
    if cfg.checkpoint_every > 0 and save_path is not None and is_main_process():
        state = RunState(save_path, to_dict(cfg), model_fingerprint(resolve_builtin(cfg.model_path)),
                         cfg.checkpoint_every, restart=restart)
    tokenizer = load_tokenizer(model)
    with timer("calibration_data"):
        batches = calibration_batches(cfg, tokenizer, params=model.params, config=model.config)
    dim = model.config.hidden_size
    _check_enough_data(cfg, batches, dim)
    log.info("calibration: %d sequences, %d tokens, %d batches, shapes %s", batches.num_sequences,
             batches.num_tokens, len(batches), batches.shapes)
    rows = RowPolicy(include_pad_rows=cfg.include_pad_rows, exclude_first_token=cfg.first_token_rows == "exclude",
                     normalize=cfg.normalize_rows)

    # Pass 1: distances of every candidate and, where memory allows, the normal equations of every
    # candidate block too, so that a single-block lstsq run needs one pass over the data.
    gather_all = (not distances_only and cfg.method in ("lstsq", "uidl")
                  and stats_bytes(len(starts), dim) <= cfg.one_pass_max_bytes)
    spec = CaptureSpec(distance_starts=tuple(starts), distance_n=n,
                       stats_blocks=tuple((s, s + n) for s in starts) if gather_all else (), rows=rows,
                       reference_distance_state=cfg.distance_state == "reference")
    with timer("pass1_distances" + ("_and_statistics" if gather_all else "")), \
            _progress(len(batches), "pass 1") as bar:
        pass1 = run_capture(model.params, model.config, spec, batches, progress=bar, mesh=mesh,
                            checkpoint=state.pass_state("pass1") if state else None)
    distances = pass1.distances()
    pass1_equations = dict(zip(starts, pass1.equations)) if gather_all else {}
    blocks = select_blocks(distances, n, cfg.num_A, cfg.merge_consecutive)
    log.info("chosen blocks %s (distances %s)", blocks, [round(distances.get(s, float("nan")), 4) for s, _ in blocks])

    results: list[BlockResult] = []
    current = model
    removed = 0
    if not distances_only:
        for index, (start, end) in enumerate(blocks):
            block_now = (start - removed, end - removed)
            saved = state.load_block(index) if state else None
            if saved is not None:  # finished before an interruption
                T, record = saved
                results.append(BlockResult(start=start, end=end, T=T, **record))
            else:
                results.append(_fit_block(cfg, model, current, index, (start, end), block_now, pass1_equations, n,
                                          batches, rows, timer, mesh, state))
                if state:
                    r = results[-1]
                    state.save_block(index, r.T, {k: getattr(r, k) for k in (
                        "relative_error_with_T", "relative_error_without_T", "fit_rows", "solver")})
            T = results[-1].T
            with timer("merge"):
                params, config = replace_block(current.params, current.config, *block_now, T)
            current = dataclasses.replace(current, params=params, config=config)
            removed += end - start
        check_finite(current.params, "merged model")

    report = {
        "tool": f"replaceme_jax {__version__}",
        "method": cfg.method,
        "model_path": cfg.model_path,
        "blocks": [[s, e] for s, e in blocks],
        "distances": [distances[s] for s in starts],
        "distance_starts": starts,
        "layers_to_skip": n,
        "num_hidden_layers_before": num_layers,
        "num_hidden_layers_after": current.config.num_hidden_layers,
        "calibration_tokens": batches.num_tokens,
        "calibration_sequences": batches.num_sequences,
        "calibration_sources": list(batches.sources),
        "calibration_batch_shapes": [list(s) for s in batches.shapes],
        "block_results": [
            {"block": [r.start, r.end], "relative_error_with_T": r.relative_error_with_T,
             "relative_error_without_T": r.relative_error_without_T, "fit_rows": r.fit_rows, "solver": r.solver}
            for r in results
        ],
        "wall_time_s": timer.seconds,
        "peak_rss_mb_after_stage": timer.peak_rss_mb,
        "config": to_dict(cfg),
        "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                     "processes": jax.process_count(), "mesh": dict(mesh.shape), "python": platform.python_version()},
    }
    if jax.process_count() > 1 and save_path is not None and not distances_only:
        current = dataclasses.replace(current, params=gather_to_host(current.params))  # collective
    if save_path is not None and is_main_process():
        with timer("export"):
            _write_outputs(cfg, current, distances, n, blocks, results, report, save_path, distances_only)
        report["wall_time_s"] = timer.seconds
        # Rewrite with the export time included; os.replace keeps the file whole at every moment.
        write_json(save_path / ".replaceme_report.json.tmp", report)
        (save_path / ".replaceme_report.json.tmp").replace(save_path / "replaceme_report.json")
    if cfg.distances_path and is_main_process():
        write_distances_csv(Path(cfg.distances_path), distances, n, blocks)
    return CompressResult(model=current, distances=distances, blocks=results, report=report, save_path=save_path)


def _write_side_files(out: Path, cfg, distances, n, blocks, results, report) -> None:
    from safetensors.numpy import save_file

    write_distances_csv(out / "distances.csv", distances, n, blocks)
    plot_distances(out / "distances.png", distances, n, blocks, title=f"{cfg.model_path}: blocks of {n} layers")
    transforms = {f"block_{r.start}_{r.end}": np.ascontiguousarray(r.T) for r in results if r.T is not None}
    if transforms:
        save_file(transforms, str(out / "transforms.safetensors"), metadata={"format": "np", "dtype": "float64"})
    write_json(out / "replaceme_report.json", report)


def _write_outputs(cfg, model, distances, n, blocks, results, report, save_path: Path, distances_only: bool):
    # A save_path holding only this run's resumable state is replaced by the finished output.
    overwrite = cfg.overwrite or only_state(save_path)
    if distances_only or cfg.save_transform_only:
        with atomic_output_dir(save_path, overwrite=overwrite) as tmp:
            _write_side_files(tmp, cfg, distances, n, blocks, results, report)
        return
    export_hf(model, save_path, dtype=cfg.save_dtype, overwrite=overwrite,
              write_extra=lambda tmp: _write_side_files(tmp, cfg, distances, n, blocks, results, report))
