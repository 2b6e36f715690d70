"""Jitted capture passes that stream statistics over calibration batches.

A step runs the decoder up to the last layer it needs (never the LM head) and returns per-batch
sums: angular distances of candidate blocks on the last real token of each sequence, and the normal
equations of the blocks being fitted. Sums are accumulated on host in float64, so memory is
O(blocks x D^2) whatever the number of tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.errors import NumericalError
from replaceme_jax.models import family_for
from replaceme_jax.replaceme.solvers import NormalEquations
from replaceme_jax.sharding import gather_to_host

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RowPolicy:
    """Which token rows enter the fit."""

    include_pad_rows: bool = False  # the reference fits padding rows too
    exclude_first_token: bool = False  # drop position 0 (attention-sink / massive-activation rows)
    normalize: bool = False  # weight each row by 1 / ||h_end - Y||^2: every token counts alike, whatever its scale

    def weights(self, attention_mask: jax.Array) -> jax.Array:
        if self.include_pad_rows:
            # pad positions of real sequences, as the reference; never the empty filler rows of a last batch
            real_row = jnp.any(attention_mask > 0, axis=-1, keepdims=True)
            w = jnp.broadcast_to(real_row, attention_mask.shape).astype(jnp.float32)
        else:
            w = attention_mask.astype(jnp.float32)
        if self.exclude_first_token:
            w = w.at[:, 0].set(0.0)
        return w


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    distance_starts: tuple[int, ...] = ()  # blocks (s, s + distance_n) whose angular distance is measured
    distance_n: int = 0
    stats_blocks: tuple[tuple[int, int], ...] = ()  # blocks whose normal equations are accumulated
    rows: RowPolicy = RowPolicy()
    reference_distance_state: bool = False  # compare post-final-norm state when end == L (reference quirk)

    @property
    def num_layers_needed(self) -> int:
        ends = [s + self.distance_n for s in self.distance_starts] + [e for _, e in self.stats_blocks]
        return max(ends) if ends else 0


def angular_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """arccos(cos(a, b)) / pi per row, in float32."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / jnp.pi


def _run_layers(params, config, input_ids, attention_mask, num_layers):
    """``(h_0..h_n, Y_k, M_k)`` of the first ``num_layers`` layers: the family's own forward."""
    out = family_for(config.model_type).forward(params, config, input_ids, attention_mask, collect_layers=True,
                                                num_layers=num_layers, compute_logits=False)
    return out.hidden_states, out.attn_residuals, out.mlp_outputs


# Row groups of the statistics: position 0 of each sequence ("first": the attention sink, with its
# massive activation) apart from every other fitted row ("rest"), so that including or excluding the
# first position is a choice made at solve time, on held-out data, without another pass.
GROUPS = ("rest", "first")
# Batches are either fitted ("fit") or held out to validate the fit ("heldout").
SPLITS = ("fit", "heldout")


def _gram_sums(m, target, h_end, w):
    mw = m * w[:, None]
    return (jnp.einsum("nd,ne->de", mw, m, precision=HIGHEST), jnp.einsum("nd,ne->de", mw, target, precision=HIGHEST),
            jnp.sum(w * jnp.sum(target * target, -1)), jnp.sum(w * jnp.sum(h_end * h_end, -1)), jnp.sum(w > 0))


def capture_step(params, config, spec: CaptureSpec, input_ids, attention_mask):
    """Per-batch sums for ``spec`` (pure function; jit it with config and spec static).

    Normal-equation sums have a leading axis of size 2 per block: the ``GROUPS`` rest and first.
    """
    hidden, ys, ms = _run_layers(params, config, input_ids, attention_mask, spec.num_layers_needed)
    out = {}
    if spec.distance_starts:
        lengths = attention_mask.sum(-1)
        last = jnp.maximum(lengths - 1, 0)
        real = (lengths > 0).astype(jnp.float32)
        rows = jnp.arange(input_ids.shape[0])
        token = attention_mask.astype(jnp.float32)
        dists, drop_sq, end_sq = [], [], []
        for s in spec.distance_starts:
            end = s + spec.distance_n
            h_end = hidden[end]
            if spec.reference_distance_state and end == config.num_hidden_layers:
                h_end = family_for(config.model_type).final_norm(params, config, h_end)
            dists.append(jnp.sum(angular_distance(hidden[s][rows, last], h_end[rows, last]) * real))
            # what dropping the block costs every real token: ||h_start - h_end||^2 against ||h_end||^2
            h_start, h_end = hidden[s].astype(jnp.float32), hidden[end].astype(jnp.float32)
            drop_sq.append(jnp.sum(token * jnp.sum((h_start - h_end) ** 2, -1)))
            end_sq.append(jnp.sum(token * jnp.sum(h_end * h_end, -1)))
        out["distance_sum"] = jnp.stack(dists)
        out["drop_sq"] = jnp.stack(drop_sq)
        out["end_sq_all"] = jnp.stack(end_sq)
        out["sequences"] = jnp.sum(real)
    if spec.stats_blocks:
        rest_weight = spec.rows.weights(attention_mask).at[:, 0].set(0.0).reshape(-1)
        first_weight = (attention_mask[:, 0] > 0).astype(jnp.float32)  # right padding: position 0 is real
        dim = config.hidden_size
        sums = {name: [] for name in ("A", "B", "target_sq", "end_sq", "rows")}
        for start, end in spec.stats_blocks:
            m = ms[start - 1].astype(jnp.float32)
            y = ys[start - 1].astype(jnp.float32)
            h_end = hidden[end].astype(jnp.float32)
            target = h_end - y
            groups = []
            for rows_m, rows_target, rows_end, w in (
                    (m.reshape(-1, dim), target.reshape(-1, dim), h_end.reshape(-1, dim), rest_weight),
                    (m[:, 0], target[:, 0], h_end[:, 0], first_weight)):  # B rows only: cheap
                if spec.rows.normalize:
                    w = w / jnp.maximum(jnp.sum(rows_target * rows_target, -1), 1e-12)
                groups.append(_gram_sums(rows_m, rows_target, rows_end, w))
            for name, values in zip(sums, zip(*groups)):
                sums[name].append(jnp.stack(values))
        out.update({name: jnp.stack(values) for name, values in sums.items()})  # [blocks, groups, ...]
    return out


@functools.lru_cache(maxsize=32)
def compiled_capture_step(config, spec: CaptureSpec):
    return jax.jit(functools.partial(capture_step, config=config, spec=spec))


class StatsAccumulator:
    """float64 host sums of capture-step outputs: distances over every batch, normal equations per
    block, split (fit / held out) and row group (rest / first)."""

    def __init__(self, spec: CaptureSpec, dim: int):
        self.spec = spec
        self.distance_sum = np.zeros(len(spec.distance_starts))
        self.drop_sq = np.zeros(len(spec.distance_starts))
        self.end_sq = np.zeros(len(spec.distance_starts))
        self.sequences = 0.0
        # sums[split][group][block]
        self.sums = {split: {group: [NormalEquations.zeros(dim) for _ in spec.stats_blocks] for group in GROUPS}
                     for split in SPLITS}
        self.batches = 0

    def add(self, out: dict, batch_index: int = 0, split: str = "fit") -> None:
        out = gather_to_host(out)
        for name, value in out.items():
            if not np.all(np.isfinite(value)):
                raise NumericalError(f"NaN/Inf in activations ({name}) at calibration batch {batch_index}")
        if "distance_sum" in out:
            self.distance_sum += np.asarray(out["distance_sum"], np.float64)
            self.drop_sq += np.asarray(out["drop_sq"], np.float64)
            self.end_sq += np.asarray(out["end_sq_all"], np.float64)
            self.sequences += float(out["sequences"])
        if "A" in out:
            for g, group in enumerate(GROUPS):
                for i, eq in enumerate(self.sums[split][group]):
                    eq.A += np.asarray(out["A"][i, g], np.float64)
                    eq.B += np.asarray(out["B"][i, g], np.float64)
                    eq.target_sq += float(out["target_sq"][i, g])
                    eq.end_sq += float(out["end_sq"][i, g])
                    eq.rows += float(out["rows"][i, g])
        self.batches += 1

    def block_equations(self, block_index: int, split: str = "fit", first_token: bool | None = None) -> NormalEquations:
        """The normal equations of one block over a split, with or without the first-position rows
        (``first_token=None``: as the spec's row policy says)."""
        if first_token is None:
            first_token = not self.spec.rows.exclude_first_token
        rest = self.sums[split]["rest"][block_index]
        return rest + self.sums[split]["first"][block_index] if first_token else rest.copy()

    @property
    def equations(self) -> list[NormalEquations]:
        """Fit-split equations of every block under the spec's row policy."""
        return [self.block_equations(i) for i in range(len(self.spec.stats_blocks))]

    def state_dict(self) -> dict:
        # 1-element arrays: orbax saves arrays, not numpy scalars
        state = {"sequences": np.array([self.sequences]), "batches": np.array([self.batches], np.int64)}
        if len(self.distance_sum):  # orbax refuses zero-size arrays
            state["distance_sum"] = self.distance_sum
            state["drop_errors"] = np.stack([self.drop_sq, self.end_sq])
        if self.spec.stats_blocks:
            every = [eq for split in SPLITS for group in GROUPS for eq in self.sums[split][group]]
            state.update(A=np.stack([e.A for e in every]), B=np.stack([e.B for e in every]),
                         sums=np.array([[e.target_sq, e.end_sq, e.rows] for e in every]))
        return state

    def load_state(self, state: dict) -> None:
        if "distance_sum" in state:
            self.distance_sum = np.array(state["distance_sum"], np.float64)
            self.drop_sq, self.end_sq = (np.array(v, np.float64) for v in state["drop_errors"])
        self.sequences = float(state["sequences"][0])
        self.batches = int(state["batches"][0])
        if self.spec.stats_blocks:
            every = [eq for split in SPLITS for group in GROUPS for eq in self.sums[split][group]]
            for i, eq in enumerate(every):
                eq.A = np.array(state["A"][i], np.float64)
                eq.B = np.array(state["B"][i], np.float64)
                eq.target_sq, eq.end_sq, eq.rows = (float(v) for v in state["sums"][i])

    def distances(self) -> dict[int, float]:
        if self.sequences == 0:
            raise NumericalError("no calibration sequence reached the distance pass")
        return {s: float(d / self.sequences) for s, d in zip(self.spec.distance_starts, self.distance_sum)}

    def drop_errors(self) -> dict[int, float]:
        """Relative error of dropping each candidate block without T, over every real token."""
        return {s: float(d / max(e, 1e-300)) for s, d, e in zip(self.spec.distance_starts, self.drop_sq, self.end_sq)}


def stats_bytes(num_blocks: int, dim: int) -> int:
    """Host float64 sums (2 splits x 2 row groups) plus device float32 per-batch sums (2 row groups) for
    A and B of every block."""
    return num_blocks * 2 * dim * dim * (len(SPLITS) * len(GROUPS) * 8 + len(GROUPS) * 4)


def _device_batch(batch, mesh):
    if mesh is None:
        return batch.input_ids, batch.attention_mask
    from replaceme_jax.sharding import put_batch

    return put_batch(batch.input_ids, mesh), put_batch(batch.attention_mask, mesh)


def run_capture(params, config, spec: CaptureSpec, batches: Iterable, progress=None, mesh=None,
                checkpoint=None, heldout_batches: Iterable = ()) -> StatsAccumulator:
    """Stream ``spec``'s statistics over ``batches`` and then ``heldout_batches`` (whose normal
    equations are kept apart, to validate a fit; distances count every batch). With a ``mesh`` each
    batch is split over its batch axes and the sums are reduced across devices (and hosts) inside the
    jitted step. With a ``checkpoint`` (a ``checkpointing.PassState``) the sums are saved every few
    batches and a rerun continues from the last save."""
    step = compiled_capture_step(config, spec)
    acc = StatsAccumulator(spec, config.hidden_size)
    done = 0
    if checkpoint is not None:
        restored = checkpoint.restore(acc.state_dict())
        if restored is not None:
            done, state = restored
            acc.load_state(state)
            if progress is not None:
                progress.update(done)
    tagged = [(b, "fit") for b in batches] + [(b, "heldout") for b in heldout_batches]
    with jax.default_matmul_precision("highest"):
        for index, (batch, split) in enumerate(tagged):
            if index < done:
                continue
            interrupt.check()
            ids, mask = _device_batch(batch, mesh)
            acc.add(step(params, input_ids=ids, attention_mask=mask), index, split)
            if checkpoint is not None:
                checkpoint.save(index + 1, acc.state_dict)  # built only when a save is due
            if progress is not None:
                progress.update(1)
    return acc


# --- rows for the cosine solver -------------------------------------------------------------------


def rows_step(params, config, block: tuple[int, int], rows: RowPolicy, input_ids, attention_mask):
    start, end = block
    hidden, ys, ms = _run_layers(params, config, input_ids, attention_mask, end)
    dim = config.hidden_size
    return {
        "M": ms[start - 1].astype(jnp.float32).reshape(-1, dim),
        "Y": ys[start - 1].astype(jnp.float32).reshape(-1, dim),
        "h_end": hidden[end].astype(jnp.float32).reshape(-1, dim),
        "weight": rows.weights(attention_mask).reshape(-1),
    }


@functools.lru_cache(maxsize=8)
def compiled_rows_step(config, block, rows: RowPolicy):
    return jax.jit(functools.partial(rows_step, config=config, block=block, rows=rows))


def collect_rows(params, config, block, rows: RowPolicy, batches: Iterable, max_rows: int, seed: int = 0,
                 progress=None, mesh=None) -> dict[str, np.ndarray]:
    """M, Y, h_end rows of one block (rows with weight > 0), at most ``max_rows`` (a uniform reservoir)."""
    step = compiled_rows_step(config, tuple(block), rows)
    rng = np.random.default_rng(seed)
    dim = config.hidden_size
    store = {k: np.empty((max_rows, dim), np.float32) for k in ("M", "Y", "h_end")}
    seen = 0
    with jax.default_matmul_precision("highest"):
        for index, batch in enumerate(batches):
            interrupt.check()
            ids, mask = _device_batch(batch, mesh)
            out = gather_to_host(step(params, input_ids=ids, attention_mask=mask))
            keep = np.nonzero(out["weight"] > 0)[0]
            for name in store:
                if not np.all(np.isfinite(out[name][keep])):
                    raise NumericalError(f"NaN/Inf in activations ({name}) at calibration batch {index}")
            # Reservoir sampling: memory stays at max_rows whatever the number of tokens.
            direct = keep[: max(0, max_rows - seen)]
            for name in store:
                store[name][seen:seen + len(direct)] = out[name][direct]
            seen += len(direct)
            rest = keep[len(direct):]
            if len(rest):
                slots = rng.integers(0, seen + 1 + np.arange(len(rest)))
                taken = slots < max_rows
                for name in store:
                    store[name][slots[taken]] = out[name][rest[taken]]
                seen += len(rest)
            if progress is not None:
                progress.update(1)
    n = min(seen, max_rows)
    return {name: array[:n] for name, array in store.items()} | {"seen": seen}
