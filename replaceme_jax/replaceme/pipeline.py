"""The ReplaceMe pipeline: calibration data -> distances -> blocks -> T -> merge -> export + report."""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from replaceme_jax.conversion import LoadedModel, export_hf, load_model, load_tokenizer
from replaceme_jax.conversion.export import check_output_location, exported_bytes
from replaceme_jax.conversion.atomic import atomic_output_dir
from replaceme_jax.conversion.model_io import check_finite, check_model_source
from replaceme_jax import __version__
from replaceme_jax.conversion.assets import resolve_builtin
from replaceme_jax.checkpointing import RunState, model_fingerprint, only_state
from replaceme_jax.capture import CaptureSpec, RowPolicy, collect_rows, run_capture, stats_bytes
from replaceme_jax.config import CompressConfig, to_dict
from replaceme_jax.errors import OutputExistsError, ReplaceMeError, UsageError
from replaceme_jax.replaceme.merge import replace_block
from replaceme_jax.replaceme.refine import batches_for_tokens, refine_kl
from replaceme_jax.replaceme.selection import candidate_starts, merge_touching, select_blocks
from replaceme_jax.replaceme.solvers import (NormalEquations, cosine_state, fit_cosine,
                                             lstsq_from_normal_equations)
from replaceme_jax.replaceme.validation import (HeldoutEvaluator, coordinate_search, limit_tokens, perplexity,
                                                sequence_nll)
from replaceme_jax.sharding import (check_batch_divides, gather_to_host, initialize_distributed, is_main_process,
                                    check_replication, make_mesh, place_fn, shard_params)
from replaceme_jax.data import Batches, batches_for, calibration_sequences, check_sources, split_heldout
from replaceme_jax.progress import progress_bar
from replaceme_jax.report import StageTimer, plot_distances, write_distances_csv, write_json

log = logging.getLogger(__name__)

TRANSFORMS_FILE = "replaceme/transforms.safetensors"  # each T, float64, key block_{start}_{end}


@dataclasses.dataclass
class BlockResult:
    start: int  # original numbering
    end: int
    T: np.ndarray | None
    relative_error_with_T: float | None  # on the fitted rows
    relative_error_without_T: float | None
    fit_rows: float
    solver: dict
    validation: dict | None = None  # held-out figures and the choices they made


@dataclasses.dataclass
class CompressResult:
    model: LoadedModel  # the pruned model (params with T merged)
    distances: dict[int, float]
    blocks: list[BlockResult]
    report: dict
    save_path: Path | None

    def module(self):
        """The pruned model as a ``flax.nnx`` ``CausalLM``."""
        from replaceme_jax.modeling import CausalLM

        return CausalLM.from_loaded(self.model)


@dataclasses.dataclass
class CalibrationData:
    batches: Batches  # fitted
    heldout_batches: Batches | None  # validation: the same statistics, kept apart
    heldout_sequences: list  # token arrays of the held-out documents
    validation_batches: Batches | None = None  # the held-out documents (up to validation_max_tokens) for perplexity

    @property
    def all_batches(self) -> int:
        return len(self.batches) + (len(self.heldout_batches) if self.heldout_batches else 0)


def _progress(total: int, desc: str):
    return progress_bar(total, desc, unit="batch")


def _check_enough_data(cfg: CompressConfig, batches, dim: int) -> None:
    if batches.num_sequences < 1:
        raise ReplaceMeError("too little calibration data: no sequence")
    if cfg.method in ("lstsq", "cosine") and not cfg.diag and cfg.alpha == 0 and batches.num_tokens < dim:
        raise ReplaceMeError(
            f"too little calibration data: {batches.num_tokens} tokens for a {dim}x{dim} transform "
            f"(need at least {dim}, or set alpha > 0 or auto)")


# The lstsq family searched on held-out data: first-position rows weighted so that their energy is
# w times the other rows' (0: left out; "include": weight 1, the plain fit of every row), and a ridge
# towards the identity of alpha * mean(diag(A_rest)). BENCHMARKS.md ("Fits validated on held-out
# documents") shows why both are needed and why neither has one right value.
FIRST_TOKEN_WEIGHTS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, "include")
RELATIVE_ALPHAS = (0.0, 1e-2, 1e-1, 1.0, 10.0)
# Coordinate searches start from both regimes seen on SmolLM2: plenty of rows (w = 0, alpha = 0.1 was
# best on 256 C4 documents) and few rows (w = 1e-3, alpha = 1 on 12 documents); from a single start
# the search stopped in a local minimum.
SEARCH_STARTS = ((0.0, 1e-1), (1e-3, 1.0))


# (T, A, B) -> the map the merge writes for T, nearest on the data of the normal equations A, B (or, with
# A = B = None, nearest to T itself)
Realize = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


def _weight_grid(cfg: CompressConfig) -> tuple:
    return {"auto": FIRST_TOKEN_WEIGHTS, "include": ("include",), "exclude": (0.0,)}.get(
        cfg.first_token_rows, (cfg.first_token_rows,))


class LstsqFamily:
    """T(w, alpha) for one block from its fitted sums (rest and first-position rows apart)."""

    def __init__(self, cfg: CompressConfig, rest: NormalEquations, first: NormalEquations):
        self.cfg, self.rest, self.first = cfg, rest, first
        self.energy_ratio = float(np.trace(first.A) / max(np.trace(rest.A), 1e-300))
        self.scale = float(np.mean(np.diag(rest.A)))

    def first_row_weight(self, w) -> float:
        """The weight of each first-position row (lambda) for a relative energy share w."""
        if w == "include":
            return 1.0
        return float(w) / self.energy_ratio if self.energy_ratio > 0 else 0.0

    def equations(self, w) -> NormalEquations:
        lam = self.first_row_weight(w)
        first = self.first
        return self.rest + NormalEquations(lam * first.A, lam * first.B, lam * first.target_sq, lam * first.end_sq,
                                           first.rows if lam else 0.0)

    def absolute_alpha(self, relative) -> float:
        return float(relative) * self.scale

    def solve(self, w, alpha: float) -> tuple[np.ndarray | None, dict]:
        eq = self.equations(w)
        if alpha == 0 and not self.cfg.diag and eq.rows < eq.A.shape[0]:
            return None, {"skipped": f"{eq.rows:.0f} rows < {eq.A.shape[0]} dimensions (not unique without a ridge)"}
        T, info = lstsq_from_normal_equations(eq.A, eq.B, alpha, self.cfg.diag, self.cfg.ridge_target)
        return T, {"condition_number": info.condition_number, "factorisation": info.method}


def _numeric_alpha(cfg: CompressConfig, family: LstsqFamily, w) -> float:
    # reference semantics: an absolute alpha, or a fraction of mean(diag(A)) with alpha_relative
    if not cfg.alpha_relative:
        return float(cfg.alpha)
    return float(cfg.alpha) * float(np.mean(np.diag(family.equations(w).A)))


def _fit_at(cfg: CompressConfig, family: LstsqFamily, realize: Realize, w,
            relative) -> tuple[np.ndarray | None, float, dict]:
    """The map the merge writes at first-position weight ``w`` and relative ridge ``relative`` (None: the
    configured alpha), its absolute alpha and the solver's info; the map is None when the fit is not unique."""
    alpha = family.absolute_alpha(relative) if relative is not None else _numeric_alpha(cfg, family, w)
    T, info = family.solve(w, alpha)
    if T is not None:
        eq = family.equations(w)
        T = realize(T, eq.A, eq.B)
    return T, alpha, info


def _searched_alphas(cfg: CompressConfig, exact_fold: bool) -> tuple:
    """The relative ridges a block's search tries (None: the configured alpha). Where the fold is not
    exact, the ridge only moves the start of the realizable fit, which costs a Riemannian descent per
    candidate: the first start's ridge alone there."""
    if cfg.alpha != "auto":
        return (None,)
    return RELATIVE_ALPHAS if exact_fold else (SEARCH_STARTS[0][1],)


def _search_lstsq(cfg: CompressConfig, family: LstsqFamily, heldout: tuple[NormalEquations, NormalEquations] | None,
                  evaluator: HeldoutEvaluator | None, timer: StageTimer, realize: Realize,
                  exact_fold: bool = True, scored: dict | None = None) -> tuple[dict, list[dict]]:
    """The T of the family with the lowest held-out perplexity (a coordinate search over the w and
    alpha grids); without validation, the one configured point. Each candidate is the map the merge
    will write (``realize``, fitted to the same normal equations). ``scored``: perplexities already
    measured by the same evaluator, by (first-position weight, relative alpha)."""
    scored = scored or {}
    weights = _weight_grid(cfg)
    alphas = _searched_alphas(cfg, exact_fold)
    records: dict[tuple[int, int], dict] = {}

    def candidate(i, j) -> float:
        w = weights[i]
        with timer("solve", quiet=True):
            T, alpha, info = _fit_at(cfg, family, realize, w, alphas[j])
        record = {"first_token_weight": w, "first_row_lambda": family.first_row_weight(w),
                  "alpha_relative": alphas[j], "alpha": alpha, **info, "T": T}
        if T is not None and heldout is not None:
            record.update(heldout_error_rest=heldout[0].relative_error(T), heldout_error_first=heldout[1].relative_error(T))
        if T is not None and evaluator is not None:
            if (w, alphas[j]) in scored:  # the same map on the same documents: the same number
                record["perplexity"] = scored[(w, alphas[j])]
            else:
                with timer("validation", quiet=True):
                    record["perplexity"] = evaluator.perplexity(T)
            log.info("held-out search: fit %d (first-position weight %s, relative alpha %s): perplexity %.3f",
                     len(records) + 1, w, alphas[j] if alphas[j] is not None else alpha, record["perplexity"])
        records[(i, j)] = record
        return record.get("perplexity", 0.0) if T is not None else float("inf")

    if evaluator is None:
        candidate(0, 0)
        best = (0, 0)
    else:  # each fit is logged: the search stops when neither axis improves, so its length is not known
        starts = sorted({(weights.index(w) if w in weights else 0, alphas.index(a) if a in alphas else 0)
                         for w, a in SEARCH_STARTS})
        best, _ = coordinate_search(candidate, (len(weights), len(alphas)), starts)
    if records[best]["T"] is None:
        raise ReplaceMeError(f"too little calibration data: {records[best]['skipped']}; set alpha > 0 or auto")
    ordered = sorted(records.values(), key=lambda r: r.get("perplexity", float("inf")))
    return records[best], ordered


@dataclasses.dataclass
class ScoredBlock:
    """What the block choice measured on the block it chose, for that block's own search to reuse."""

    evaluator: HeldoutEvaluator
    perplexities: dict  # (first-position weight, relative alpha) -> held-out perplexity
    perplexity_without_T: float


def _block_choice_method(cfg: CompressConfig, distances_only: bool, gather_all: bool,
                         data: CalibrationData) -> tuple[str, str | None]:
    """How this run chooses its block: ``heldout``, ``distance`` (with, for ``auto``, why not heldout), or
    ``refused`` (heldout asked for and impossible)."""
    if cfg.blocks is not None:
        return "given", None
    if distances_only or cfg.block_choice == "distance":
        return "distance", None
    # config validation refuses an explicit heldout for the first two; auto falls back quietly
    why = ("it scores lstsq maps (method " + cfg.method + ")" if cfg.method != "lstsq" else
           "it chooses one block (num_A " + str(cfg.num_A) + ")" if cfg.num_A != 1 else
           "no held-out documents (validation_fraction 0)" if data.validation_batches is None else
           "every candidate's statistics would not fit in one_pass_max_bytes" if not gather_all else None)
    if why is not None:
        return ("refused", why) if cfg.block_choice == "heldout" else ("distance", why)
    tokens = sum(int(np.asarray(batch.attention_mask).sum()) for batch in data.validation_batches)
    if cfg.block_choice == "auto" and tokens < cfg.block_choice_min_tokens:
        return "distance", (f"{tokens} held-out tokens, fewer than block_choice_min_tokens "
                            f"({cfg.block_choice_min_tokens})")
    return "heldout", None


def _choose_block_on_heldout(cfg: CompressConfig, model: LoadedModel, pass1, distances: dict[int, float],
                             starts: list[int], n: int, data: CalibrationData) -> tuple[list, dict, ScoredBlock]:
    """Of the ``block_candidates`` blocks of lowest angular distance, the one whose lstsq map (as the
    merge writes it) gives the lowest held-out perplexity. The distance says how far the block moves the
    hidden state, not how well one linear map can stand in for it.

    The distance's own block gets its whole search (what ``distance`` would write), so another block is
    taken only when one of its maps already scores better: the choice never writes a block that does worse
    on the held-out documents than the paper's. Under ``fallback: uidl`` a block scores what would be
    written: its best map, or the block dropped where that is better."""
    ranked = sorted(distances, key=lambda s: (distances[s], s))[:cfg.block_candidates]
    weights = _weight_grid(cfg)
    alphas = _searched_alphas(cfg, model.family.FOLDS_ANY_OUTPUT_MAP)
    # The other candidates: both search starts, and every weight and every ridge through the first. The
    # best ridge differs from block to block (SmolLM2, C4, n = 8: (12, 20) scores 94.2 at ridge 0.1 and 83.5
    # without one), and so does the best first-position weight (self-generated text, n = 4: (12, 16)
    # scores 264,384 at weight 0 and 8.8 with the first position included).
    first_weight = SEARCH_STARTS[0][0] if cfg.first_token_rows == "auto" else weights[0]
    first_alpha = SEARCH_STARTS[0][1] if cfg.alpha == "auto" else None
    points = {(w if cfg.first_token_rows == "auto" else weights[0], a if cfg.alpha == "auto" else None)
              for w, a in SEARCH_STARTS}
    points |= {(first_weight, a) for a in alphas} | {(w, first_alpha) for w in weights}
    scored, leader = [], None  # the best block so far keeps its evaluator (prefix states: tokens x hidden x 2)
    for rank, start in enumerate(ranked):
        index = starts.index(start)
        family = LstsqFamily(cfg, pass1.sums["fit"]["rest"][index], pass1.sums["fit"]["first"][index])
        evaluator = HeldoutEvaluator(model.params, model.config, start, start + n, data.validation_batches)
        realize = functools.partial(model.family.realizable_output_map, model.params["layers"][start - 1],
                                    model.config)
        perplexities = {}
        if rank == 0:
            _, tried = _search_lstsq(cfg, family, None, evaluator, StageTimer(), realize,
                                     model.family.FOLDS_ANY_OUTPUT_MAP)
            for record in tried:
                if "perplexity" in record:
                    perplexities[(record["first_token_weight"], record["alpha_relative"])] = record["perplexity"]
        else:
            for w, relative in sorted(points, key=str):
                T, _, _ = _fit_at(cfg, family, realize, w, relative)
                if T is not None:
                    perplexities[(w, relative)] = evaluator.perplexity(T)
        best = {"perplexity": float("inf")}
        if perplexities:
            (w, relative), ppl = min(perplexities.items(), key=lambda item: item[1])
            best = {"perplexity": ppl, "first_token_weight": w, "alpha_relative": relative}
        dropped = evaluator.perplexity(None)
        # a block with no map at all is not a candidate: its search would stop the run
        written = min(best["perplexity"], dropped) if cfg.fallback == "uidl" and perplexities else best["perplexity"]
        scored.append({"block": [start, start + n], "distance": distances[start], **best,
                       "perplexity_without_T": dropped, "score": written, "maps_scored": len(perplexities),
                       "searched": rank == 0})
        if leader is None or written < leader[0]["score"]:  # ties keep the lower distance
            leader = (scored[-1], ScoredBlock(evaluator, perplexities, dropped))
        del evaluator
        log.info("block choice: (%d, %d) distance %.4f, held-out perplexity %.3f with T (%d maps), %.3f dropped",
                 start, start + n, distances[start], best["perplexity"], len(perplexities), dropped)
    chosen = leader[0]
    if chosen["score"] == float("inf"):
        raise ReplaceMeError("block_choice: heldout: no candidate block has a map (too little calibration data; "
                             "set alpha > 0 or auto)")
    start = chosen["block"][0]
    log.info("block choice: (%d, %d) by held-out perplexity (lowest distance: (%d, %d))", start, start + n,
             ranked[0], ranked[0] + n)
    return [(start, start + n)], {"method": "heldout", "candidates": scored, "chosen": chosen["block"]}, leader[1]


def _cosine_T(cfg: CompressConfig, model: LoadedModel, block: tuple[int, int], policy: str, T0, batches,
              timer: StageTimer, mesh=None, checkpoint=None) -> tuple[np.ndarray, dict]:
    """The cosine solver on rows of ``block`` under ``policy``, bounded by cosine_max_tokens."""
    rows = RowPolicy(include_pad_rows=cfg.include_pad_rows, exclude_first_token=policy == "exclude",
                     normalize=cfg.normalize_rows)
    with timer("collect_rows"), _progress(len(batches), "rows for cosine") as bar:
        data = collect_rows(model.params, model.config, block, rows, batches, cfg.cosine_max_tokens,
                            seed=cfg.seed, progress=bar, mesh=mesh)
    target = data["h_end"] if cfg.accurate else data["h_end"] - data["Y"]
    resume = None
    if checkpoint is not None:
        # the template's shapes come from a zero-epoch state of the same problem
        template = cosine_state(np.zeros((model.config.hidden_size,) * 2, np.float32),
                                optax.adam(cfg.cosine_lr).init(jnp.zeros((model.config.hidden_size,) * 2)),
                                jax.random.PRNGKey(0), [0.0], cfg.cosine_epochs)
        restored = checkpoint.restore(template)
        resume = restored[1] if restored is not None else None
    with timer("solve"), progress_bar(cfg.cosine_epochs, "cosine epochs", unit="epoch") as bar:
        def report(epoch, loss):
            bar.set_postfix(loss=f"{loss:.5f}")
            bar.update(1)
        result = fit_cosine(data["M"], target, data["Y"], accurate=cfg.accurate, loss=cfg.loss, T0=T0,
                            lr=cfg.cosine_lr, epochs=cfg.cosine_epochs, batch_rows=cfg.cosine_batch_rows,
                            seed=cfg.seed, l1=cfg.cosine_l1, progress=report, resume=resume,
                            on_epoch=(lambda st: checkpoint.save(int(st["epochs_done"][0]), st, force=True))
                            if checkpoint is not None else None)
    return result.T, {"method": "cosine", "loss": cfg.loss, "accurate": cfg.accurate, "init": cfg.cosine_init,
                      "first_token_rows": policy, "rows_used": int(len(data["M"])), "rows_seen": int(data["seen"]),
                      "losses": result.losses, "lr": cfg.cosine_lr, "epochs": cfg.cosine_epochs, "l1": cfg.cosine_l1}


def _fit_block(cfg, model, current, index, block, block_now, pass1, n, data: CalibrationData, timer, mesh,
               state, original_perplexity, scored_block: ScoredBlock | None = None) -> BlockResult:
    start, end = block
    rows = RowPolicy(include_pad_rows=cfg.include_pad_rows, normalize=cfg.normalize_rows)
    reuse = pass1 is not None and (start, end) in pass1.spec.stats_blocks and (index == 0 or not cfg.sequential)
    if cfg.method == "uidl":
        acc, block_index = None, None
    elif reuse:
        acc, block_index = pass1, pass1.spec.stats_blocks.index((start, end))
    else:
        # The earlier blocks are already replaced in `current`: fit on the model as it will be.
        source = current if cfg.sequential else model
        block_src = block_now if cfg.sequential else block
        with timer("statistics_pass"), _progress(data.all_batches, f"statistics {start}-{end}") as bar:
            acc = run_capture(source.params, source.config, CaptureSpec(stats_blocks=(block_src,), rows=rows),
                              data.batches, progress=bar, mesh=mesh, heldout_batches=data.heldout_batches or (),
                              checkpoint=state.pass_state(f"stats_{index}") if state else None)
        block_index = 0
    evaluator = validation = None
    if data.heldout_batches is not None:
        with timer("validation"):
            # the block choice's evaluator of this block holds the same prefix states
            evaluator = scored_block.evaluator if scored_block is not None else \
                HeldoutEvaluator(current.params, current.config, *block_now, data.validation_batches)
            validation = {"heldout_sequences": len(data.heldout_sequences),
                          "heldout_tokens": int(sum(len(s) for s in data.heldout_sequences)),
                          "perplexity_tokens": evaluator.tokens, "perplexity_original": original_perplexity,
                          "perplexity_without_T": scored_block.perplexity_without_T if scored_block is not None
                          else evaluator.perplexity(None)}
    if cfg.method == "uidl":
        # on the original model, as the distances; a merged block is longer than any measured one
        error = pass1.drop_errors().get(start) if end - start == n else None
        return BlockResult(start=start, end=end, T=None, relative_error_with_T=None, relative_error_without_T=error,
                           fit_rows=0.0, solver={"method": "uidl"}, validation=validation)

    family = LstsqFamily(cfg, acc.sums["fit"]["rest"][block_index], acc.sums["fit"]["first"][block_index])
    heldout = (acc.sums["heldout"]["rest"][block_index], acc.sums["heldout"]["first"][block_index]) \
        if evaluator is not None else None
    if heldout is not None:  # dropping the block (T = I), in closed form, beside each candidate's
        validation.update(heldout_error_without_T_rest=heldout[0].relative_error(None),
                          heldout_error_without_T_first=heldout[1].relative_error(None))
    # the map the merge writes into the last kept layer, nearest to each fit on its own data
    fold_family = current.family
    realize = functools.partial(fold_family.realizable_output_map, current.params["layers"][block_now[0] - 1],
                                current.config)
    chosen, tried = _search_lstsq(cfg, family, heldout, evaluator, timer, realize, fold_family.FOLDS_ANY_OUTPUT_MAP,
                                  scored_block.perplexities if scored_block is not None else None)
    T = chosen["T"]
    fit = family.equations(chosen["first_token_weight"])
    solver = {"method": "lstsq", "first_token_energy_ratio": family.energy_ratio,
              **{k: v for k, v in chosen.items() if k != "T"}}
    if cfg.method == "cosine":
        w = chosen["first_token_weight"]
        policy = "include" if w == "include" or w > 0 else "exclude"
        T, solver = _cosine_T(cfg, current if cfg.sequential else model, block_now if cfg.sequential else block,
                              policy, T if cfg.cosine_init == "lstsq" else None, data.batches, timer, mesh,
                              checkpoint=state.pass_state(f"cosine_{index}") if state else None)
        fit = family.equations("include" if policy == "include" else 0.0)
        with timer("solve", quiet=True):
            T = realize(T, fit.A, fit.B)
        if evaluator is not None:
            with timer("validation"):
                solver["perplexity"] = evaluator.perplexity(T)
            tried = [{k: v for k, v in solver.items() if k != "losses"}] + tried
        chosen = solver
    if cfg.refine == "kl":
        T, chosen = _refine(cfg, model, current if cfg.sequential else model,
                            block_now if cfg.sequential else block, T, chosen, solver, data, evaluator, timer,
                            None if fold_family.FOLDS_ANY_OUTPUT_MAP else realize, named=(start, end))
    if validation is not None:
        validation["candidates"] = [{k: v for k, v in r.items() if k != "T"} for r in tried]
        validation["perplexity_with_T"] = chosen["perplexity"]
        if heldout is not None and T is not None:
            validation.update(heldout_error_with_T_rest=heldout[0].relative_error(T),
                              heldout_error_with_T_first=heldout[1].relative_error(T))
        beats = chosen["perplexity"] <= validation["perplexity_without_T"]  # a tie: T is the identity
        validation["T_beats_dropping"] = bool(beats)
        validation["fallback"] = False
        log.info("block (%d, %d) held-out perplexity (%d tokens): original %.3f, dropped %.3f, with T %.3f "
                 "(%d candidates tried)", start, end, evaluator.tokens, original_perplexity,
                 validation["perplexity_without_T"], chosen["perplexity"], len(tried))
        if not beats:
            keep = cfg.fallback == "none"
            log.warning("block (%d, %d): T does not beat dropping the block on held-out data (perplexity %.3f vs "
                        "%.3f); %s", start, end, chosen["perplexity"], validation["perplexity_without_T"],
                        "keeping T as fallback: none asks" if keep else
                        "writing the block dropped without T (set fallback: none to keep T)")
            if not keep:
                T, validation["fallback"] = None, True
    return BlockResult(start=start, end=end, T=T, relative_error_with_T=fit.relative_error(T) if T is not None else None,
                       relative_error_without_T=fit.relative_error(None), fit_rows=fit.rows, solver=solver,
                       validation=validation)


REFINE_MIN_RELATIVE_GAIN = 1e-3  # held-out perplexity must drop by 0.1% for a refined T to be kept


def _refine(cfg: CompressConfig, original: LoadedModel, source: LoadedModel, block: tuple[int, int], T, chosen: dict,
            solver: dict, data: CalibrationData, evaluator: HeldoutEvaluator | None, timer: StageTimer,
            realize: Realize | None = None, *, named: tuple[int, int]):
    """``refine: kl`` from the chosen T; the refined T replaces it only if held-out perplexity drops (by
    more than ``REFINE_MIN_RELATIVE_GAIN``).
    ``realize`` (families whose fold cannot carry every map, as Gemma's post-MLP norm): the refined T is
    first replaced by the foldable map nearest to it, so what is validated and kept is what is written.
    ``named``: the block in the original model's numbering, for the log (``block`` is in ``source``'s)."""
    with timer("refine"):
        result = refine_kl(original.params, original.config, source.params, source.config, *block, T,
                           batches_for_tokens(data.batches, cfg.refine_tokens),
                           steps=cfg.refine_steps, lr=cfg.refine_lr, top_k=cfg.refine_top_k)
    refined = result.T
    if realize is not None:
        with timer("solve", quiet=True):  # nearest to the refined map itself: the fit's data would undo it
            refined = realize(refined, None, None)
    record = {"method": "kl", "steps": result.steps, "lr": cfg.refine_lr, "tokens": result.tokens,
              "top_k": cfg.refine_top_k, "seconds": round(result.seconds, 2), "kl_first": result.losses[0],
              "kl_last": result.losses[-1], "projected_to_foldable": realize is not None}
    kept = True
    if evaluator is not None:
        with timer("validation"):
            after = evaluator.perplexity(refined)
        before = chosen.get("perplexity", float("inf"))
        record.update(perplexity_before=before, perplexity_after=after)
        # a gain within noise is not a gain: at an exact fit (a planted identity block) Adam's normalised
        # steps still wander, and a coin-flip keep would make the written model depend on rounding
        kept = after < before * (1 - REFINE_MIN_RELATIVE_GAIN)
    record["kept"] = kept
    solver["refine"] = record
    log.info("block (%d, %d) refine kl: %d steps in %.1f s, KL %.4f -> %.4f%s", *named, result.steps,
             result.seconds, result.losses[0], result.losses[-1],
             f", held-out perplexity {record['perplexity_before']:.3f} -> {record['perplexity_after']:.3f}"
             f" ({'kept' if kept else 'not kept'})" if evaluator is not None else "")
    if not kept:
        return T, chosen
    return refined, {**chosen, "perplexity": record.get("perplexity_after", chosen.get("perplexity"))}


def compress(cfg: CompressConfig, distances_only: bool = False, restart: bool = False, *,
             model: LoadedModel | None = None, sequences: list[np.ndarray] | None = None,
             tokenizer=None) -> CompressResult:
    """Run the whole pipeline for ``cfg``; write ``cfg.save_path`` (unless ``distances_only`` with no path).

    ``model``: a model already in memory (``cfg.model_path`` is then only a label); ``sequences``:
    calibration token ids already made (``cfg.dataset`` is then ignored); ``tokenizer``: instead of the
    model's own (with ``sequences`` and no tokenizer at all, padding uses id 0). These serve the Python API
    (``replaceme_jax.compress``). Unless ``checkpoint_every`` is 0 or the model is in memory, the
    streaming state is saved under ``save_path/.state`` and a rerun resumes from it (``restart``
    discards it).
    """
    timer = StageTimer()
    save_path = Path(cfg.save_path) if cfg.save_path else None
    if (save_path is not None and save_path.exists() and not only_state(save_path) and any(save_path.iterdir())
            and not cfg.overwrite):
        raise OutputExistsError(save_path)
    # Everything that can fail without the model loaded fails now, in seconds.
    if save_path is not None:
        check_output_location(save_path, 0)
    if sequences is None:
        check_sources(cfg.dataset)
    if model is None:
        check_model_source(cfg.model_path)
    initialize_distributed(cfg.distributed)
    if not is_main_process():
        logging.getLogger("replaceme_jax").setLevel(logging.WARNING)
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg.batch_size, mesh)
    with timer("load_model"):
        if model is not None:
            if mesh.size > 1:
                model = dataclasses.replace(model, params=shard_params(
                    model.params, model.family.param_specs(model.config), mesh))
        elif mesh.size > 1:
            # every format (HF, GGUF, orbax) loads straight into its shards; say what stays replicated
            model = load_model(cfg.model_path, dtype=cfg.dtype, place=place_fn(mesh))
            check_replication(model.family.param_specs(model.config), mesh)
        else:
            model = load_model(cfg.model_path, dtype=cfg.dtype)
        check_finite(model.params, cfg.model_path)
    log.info("mesh %s over %d device(s), %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())
    n = cfg.layers_to_skip
    num_layers = model.config.num_hidden_layers
    starts = candidate_starts(num_layers, n, cfg.min_distance_layer)
    if cfg.blocks is None and cfg.num_A > len(starts):
        raise UsageError(f"num_A={cfg.num_A} blocks of {n} layers do not fit in {num_layers} layers")
    for start, end in cfg.blocks or ():
        if end > num_layers:
            raise UsageError(f"config key 'blocks': [{start}, {end}] ends past the model's {num_layers} layers")
    removed_layers = sum(e - s for s, e in cfg.blocks) if cfg.blocks else n * cfg.num_A
    if num_layers - removed_layers < 2 or removed_layers > num_layers / 2:
        log.warning("removing %d of %d layers leaves %d: %s", removed_layers, num_layers, num_layers - removed_layers,
                    "fewer than 2" if num_layers - removed_layers < 2 else
                    "more than half of the model is gone, expect a large loss of quality")
    if save_path is not None and is_main_process():
        needed = 0 if (distances_only or cfg.save_transform_only) else exported_bytes(
            model.params, cfg.save_dtype or model.source_dtype)
        check_output_location(save_path, needed)
    state = None
    # An in-memory model has no file to fingerprint, so its runs do not resume.
    if cfg.checkpoint_every != 0 and save_path is not None and model.source_format != "memory":
        state = RunState(save_path, to_dict(cfg), model_fingerprint(resolve_builtin(cfg.model_path)),
                         cfg.checkpoint_every, restart=restart)
    if tokenizer is None and not (sequences is not None and model.tokenizer_source is None):
        tokenizer = load_tokenizer(model)
    with timer("calibration_data"):
        if sequences is None:
            sequences, sources = calibration_sequences(cfg, tokenizer, params=model.params, config=model.config)
        else:
            sources = ({"dataset": "<sequences>", "sequences": len(sequences),
                        "tokens": int(sum(len(s) for s in sequences))},)
        validate = not distances_only and cfg.validation_fraction > 0
        fit_sequences, heldout_sequences = split_heldout(
            sequences, cfg.validation_fraction if validate else 0.0, cfg.validation_min_sequences, cfg.seed)
        scored = limit_tokens(heldout_sequences, cfg.validation_max_tokens) if heldout_sequences else []
        data = CalibrationData(batches_for(cfg, fit_sequences, tokenizer, sources),
                               batches_for(cfg, heldout_sequences, tokenizer) if heldout_sequences else None,
                               heldout_sequences, batches_for(cfg, scored, tokenizer) if scored else None)
    batches = data.batches
    dim = model.config.hidden_size
    _check_enough_data(cfg, batches, dim)
    log.info("calibration: %d sequences, %d tokens, %d batches, shapes %s; %d sequences (%d tokens) held out",
             batches.num_sequences, batches.num_tokens, len(batches), batches.shapes, len(heldout_sequences),
             sum(len(s) for s in heldout_sequences))
    rows = RowPolicy(include_pad_rows=cfg.include_pad_rows, normalize=cfg.normalize_rows)

    # Pass 1: distances of every candidate and, where memory allows, the normal equations of every
    # candidate block too, so that a single-block lstsq run needs one pass over the data; of given blocks,
    # those a fit can use (a later block of a sequential run is fitted on the model with earlier ones replaced).
    # UIDL needs the distances only (and dropping errors, scalars per candidate): one light pass.
    given = None
    if cfg.blocks is not None:
        given = merge_touching(cfg.blocks) if cfg.merge_consecutive else sorted(map(tuple, cfg.blocks))
    stats_blocks = tuple((s, s + n) for s in starts) if given is None else tuple(given[:1] if cfg.sequential else given)
    gather_all = (not distances_only and cfg.method == "lstsq"
                  and stats_bytes(len(stats_blocks), dim) <= cfg.one_pass_max_bytes)
    choice_method, choice_note = _block_choice_method(cfg, distances_only, gather_all, data)
    if choice_method == "refused":
        if not gather_all:
            raise UsageError(f"block_choice: heldout needs every candidate's statistics from pass 1 "
                             f"({stats_bytes(len(starts), dim) / 2**30:.1f} GiB; one_pass_max_bytes allows "
                             f"{cfg.one_pass_max_bytes / 2**30:.1f}); raise one_pass_max_bytes or use "
                             f"block_choice: distance")
        raise UsageError(f"block_choice: heldout cannot score the candidates: {choice_note}")
    spec = CaptureSpec(distance_starts=tuple(starts), distance_n=n,
                       stats_blocks=stats_blocks if gather_all else (), rows=rows,
                       reference_distance_state=cfg.distance_state == "reference")
    with timer("pass1_distances" + ("_and_statistics" if gather_all else "")), \
            _progress(data.all_batches, "pass 1") as bar:
        pass1 = run_capture(model.params, model.config, spec, batches, progress=bar, mesh=mesh,
                            checkpoint=state.pass_state("pass1") if state else None,
                            heldout_batches=data.heldout_batches or ())
    distances = pass1.distances()
    blocks = given if given is not None else select_blocks(distances, n, cfg.num_A, cfg.merge_consecutive)
    block_choice, scored_block = {"method": choice_method if choice_method == "given" else "distance"}, None
    if choice_method == "heldout":
        with timer("block_choice"):
            blocks, block_choice, scored_block = _choose_block_on_heldout(cfg, model, pass1, distances, starts, n,
                                                                          data)
    elif choice_note:
        log.info("block_choice: auto takes the lowest distance: %s", choice_note)
        block_choice["auto"] = choice_note
    block_choice["requested"] = cfg.block_choice
    # a given block of another size than layers_to_skip has no distance in the profile
    log.info("chosen blocks %s (distances %s)", blocks,
             [round(distances[s], 4) if e - s == n and s in distances else None for s, e in blocks])

    results: list[BlockResult] = []
    current = model
    removed = 0
    original_perplexity = None
    if not distances_only:
        if data.heldout_batches is not None:
            with timer("validation"):
                original_perplexity = perplexity(*sequence_nll(model.params, model.config, scored,
                                                               batch_size=cfg.batch_size, max_length=cfg.max_length))
        for index, (start, end) in enumerate(blocks):
            block_now = (start - removed, end - removed)
            saved = state.load_block(index) if state else None
            if saved is not None:  # finished before an interruption
                T, record = saved
                results.append(BlockResult(start=start, end=end, T=T, **record))
            else:
                results.append(_fit_block(cfg, model, current, index, (start, end), block_now,
                                          pass1 if gather_all or cfg.method == "uidl" else None, n, data,
                                          timer, mesh, state, original_perplexity,
                                          scored_block if index == 0 else None))
                if state:
                    r = results[-1]
                    state.save_block(index, r.T, {k: getattr(r, k) for k in (
                        "relative_error_with_T", "relative_error_without_T", "fit_rows", "solver", "validation")})
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
        "block_choice": block_choice,
        "distances": [distances[s] for s in starts],
        "distance_starts": starts,
        "layers_to_skip": n,
        "num_hidden_layers_before": num_layers,
        "num_hidden_layers_after": current.config.num_hidden_layers,
        "calibration_tokens": batches.num_tokens,
        "calibration_sequences": batches.num_sequences,
        "heldout_sequences": len(heldout_sequences),
        "heldout_tokens": int(sum(len(s) for s in heldout_sequences)),
        "calibration_sources": list(batches.sources),
        "calibration_batch_shapes": [list(s) for s in batches.shapes],
        "block_results": [
            {"block": [r.start, r.end], "relative_error_with_T": r.relative_error_with_T,
             "relative_error_without_T": r.relative_error_without_T, "fit_rows": r.fit_rows, "solver": r.solver,
             "validation": r.validation}
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


def write_transforms(out: Path, transforms: dict[tuple[int, int], np.ndarray]) -> None:
    """Each T, by its block ``(start, end)`` in the original numbering, to ``out/TRANSFORMS_FILE`` (float64,
    key ``block_{start}_{end}``)."""
    from safetensors.numpy import save_file

    # In a folder of its own: tools that glob an HF directory's top level for *.safetensors must not
    # take it for a weight shard.
    (out / TRANSFORMS_FILE).parent.mkdir(exist_ok=True)
    save_file({f"block_{start}_{end}": np.ascontiguousarray(T) for (start, end), T in transforms.items()},
              str(out / TRANSFORMS_FILE), metadata={"format": "np", "dtype": "float64"})


def read_transforms(out: Path) -> dict[tuple[int, int], np.ndarray]:
    """The T's ``write_transforms`` wrote to ``out``, by block ``(start, end)``."""
    from safetensors.numpy import load_file

    return {tuple(int(i) for i in key.removeprefix("block_").split("_")): T
            for key, T in load_file(str(Path(out) / TRANSFORMS_FILE)).items()}


def _write_side_files(out: Path, cfg, distances, n, blocks, results, report) -> None:
    write_distances_csv(out / "distances.csv", distances, n, blocks)
    plot_distances(out / "distances.png", distances, n, blocks, title=f"{cfg.model_path}: blocks of {n} layers")
    transforms = {(r.start, r.end): r.T for r in results if r.T is not None}
    if transforms:
        write_transforms(out, transforms)
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
