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

from replaceme_jax.errors import NumericalError
from replaceme_jax.models import llama
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
    ctx = llama.attention_context(config, input_ids.shape, attention_mask)
    h = llama.embed(params, input_ids)
    hidden, ys, ms = [h], [], []
    for index in range(num_layers):
        h, y, m = llama.decoder_layer(params["layers"][index], config, index, h, ctx)
        hidden.append(h)
        ys.append(y)
        ms.append(m)
    return hidden, ys, ms


def capture_step(params, config, spec: CaptureSpec, input_ids, attention_mask):
    """Per-batch sums for ``spec`` (pure function; jit it with config and spec static)."""
    hidden, ys, ms = _run_layers(params, config, input_ids, attention_mask, spec.num_layers_needed)
    out = {}
    if spec.distance_starts:
        lengths = attention_mask.sum(-1)
        last = jnp.maximum(lengths - 1, 0)
        real = (lengths > 0).astype(jnp.float32)
        rows = jnp.arange(input_ids.shape[0])
        dists = []
        for s in spec.distance_starts:
            end = s + spec.distance_n
            h_end = hidden[end]
            if spec.reference_distance_state and end == config.num_hidden_layers:
                h_end = llama.final_norm(params, config, h_end)
            dists.append(jnp.sum(angular_distance(hidden[s][rows, last], h_end[rows, last]) * real))
        out["distance_sum"] = jnp.stack(dists)
        out["sequences"] = jnp.sum(real)
    if spec.stats_blocks:
        w = spec.rows.weights(attention_mask).reshape(-1)
        dim = config.hidden_size
        A, B, target_sq, end_sq = [], [], [], []
        for start, end in spec.stats_blocks:
            m = ms[start - 1].astype(jnp.float32).reshape(-1, dim)
            target = (hidden[end].astype(jnp.float32) - ys[start - 1].astype(jnp.float32)).reshape(-1, dim)
            h_end = hidden[end].astype(jnp.float32).reshape(-1, dim)
            wb = w
            if spec.rows.normalize:
                wb = w / jnp.maximum(jnp.sum(target * target, -1), 1e-12)
            mw = m * wb[:, None]
            A.append(jnp.einsum("nd,ne->de", mw, m, precision=HIGHEST))
            B.append(jnp.einsum("nd,ne->de", mw, target, precision=HIGHEST))
            target_sq.append(jnp.sum(wb * jnp.sum(target * target, -1)))
            end_sq.append(jnp.sum(wb * jnp.sum(h_end * h_end, -1)))
        out["A"] = jnp.stack(A)
        out["B"] = jnp.stack(B)
        out["target_sq"] = jnp.stack(target_sq)
        out["end_sq"] = jnp.stack(end_sq)
        out["rows"] = jnp.sum(w > 0)
    return out


@functools.lru_cache(maxsize=32)
def compiled_capture_step(config, spec: CaptureSpec):
    return jax.jit(functools.partial(capture_step, config=config, spec=spec))


class StatsAccumulator:
    """float64 host sums of capture-step outputs."""

    def __init__(self, spec: CaptureSpec, dim: int):
        self.spec = spec
        self.distance_sum = np.zeros(len(spec.distance_starts))
        self.sequences = 0.0
        self.equations = [NormalEquations.zeros(dim) for _ in spec.stats_blocks]
        self.batches = 0

    def add(self, out: dict, batch_index: int = 0) -> None:
        out = gather_to_host(out)
        for name, value in out.items():
            if not np.all(np.isfinite(value)):
                raise NumericalError(f"NaN/Inf in activations ({name}) at calibration batch {batch_index}")
        if "distance_sum" in out:
            self.distance_sum += np.asarray(out["distance_sum"], np.float64)
            self.sequences += float(out["sequences"])
        if "A" in out:
            for i, eq in enumerate(self.equations):
                eq.A += np.asarray(out["A"][i], np.float64)
                eq.B += np.asarray(out["B"][i], np.float64)
                eq.target_sq += float(out["target_sq"][i])
                eq.end_sq += float(out["end_sq"][i])
                eq.rows += float(out["rows"])
        self.batches += 1

    def state_dict(self) -> dict:
        # 1-element arrays: orbax saves arrays, not numpy scalars
        state = {"sequences": np.array([self.sequences]), "batches": np.array([self.batches], np.int64)}
        if len(self.distance_sum):  # orbax refuses zero-size arrays
            state["distance_sum"] = self.distance_sum
        if self.equations:
            state.update(A=np.stack([e.A for e in self.equations]), B=np.stack([e.B for e in self.equations]),
                         sums=np.array([[e.target_sq, e.end_sq, e.rows] for e in self.equations]))
        return state

    def load_state(self, state: dict) -> None:
        if "distance_sum" in state:
            self.distance_sum = np.array(state["distance_sum"], np.float64)
        self.sequences = float(state["sequences"][0])
        self.batches = int(state["batches"][0])
        for i, eq in enumerate(self.equations):
            eq.A = np.array(state["A"][i], np.float64)
            eq.B = np.array(state["B"][i], np.float64)
            eq.target_sq, eq.end_sq, eq.rows = (float(v) for v in state["sums"][i])

    def distances(self) -> dict[int, float]:
        if self.sequences == 0:
            raise NumericalError("no calibration sequence reached the distance pass")
        return {s: float(d / self.sequences) for s, d in zip(self.spec.distance_starts, self.distance_sum)}


def stats_bytes(num_blocks: int, dim: int) -> int:
    """Host float64 plus device float32 for A and B of every block."""
    return num_blocks * 2 * dim * dim * (8 + 4)


def _device_batch(batch, mesh):
    if mesh is None:
        return batch.input_ids, batch.attention_mask
    from replaceme_jax.sharding import put_batch

    return put_batch(batch.input_ids, mesh), put_batch(batch.attention_mask, mesh)


def run_capture(params, config, spec: CaptureSpec, batches: Iterable, progress=None, mesh=None,
                checkpoint=None) -> StatsAccumulator:
    """Stream ``spec``'s statistics over ``batches``. With a ``mesh`` each batch is split over its batch
    axes and the sums are reduced across devices (and hosts) inside the jitted step. With a
    ``checkpoint`` (a ``checkpointing.PassState``) the sums are saved every few batches and a rerun
    continues from the last save."""
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
    with jax.default_matmul_precision("highest"):
        for index, batch in enumerate(batches):
            if index < done:
                continue
            ids, mask = _device_batch(batch, mesh)
            acc.add(step(params, input_ids=ids, attention_mask=mask), index)
            if checkpoint is not None:
                checkpoint.save(index + 1, acc.state_dict())
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
