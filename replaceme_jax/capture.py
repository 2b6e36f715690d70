"""Capture passes that stream statistics over calibration batches.

A batch walks the decoder layer by layer up to the last layer it needs (never the LM head): each step
is the family's own layer, jitted with the layer's parameters as arguments, so every layer of one kind
(Gemma: sliding or full) shares one compilation and compile time does not grow with depth. Jitted
functions on the states the walk returns give the per-batch sums: angular distances of candidate
blocks on the last real token of each sequence, and the normal equations of the blocks being fitted.

The sums stay on the device, in float32 with Kahan compensation (the accumulators donated to each
update): no device-to-host transfer per batch, and memory O(blocks x D^2) whatever the number of
tokens. They reach the host, as float64 ``sum - compensation``, only when read or checkpointed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.errors import NumericalError
from replaceme_jax.models import family_for
from replaceme_jax.replaceme.solvers import NormalEquations
from replaceme_jax.sharding import gather_to_host, settle

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


# Row groups of the statistics: position 0 of each sequence ("first": the attention sink, with its
# massive activation) apart from every other fitted row ("rest"), so that including or excluding the
# first position is a choice made at solve time, on held-out data, without another pass.
GROUPS = ("rest", "first")
# Batches are either fitted ("fit") or held out to validate the fit ("heldout").
SPLITS = ("fit", "heldout")
NO_BAD_BATCH = np.iinfo(np.int32).max  # the accumulators' "first non-finite batch" when there is none


# --- the layer walk ---------------------------------------------------------------------------------


def _canonical_layer(config, index: int) -> int:
    # The layer index only chooses the attention window and rope table (its layer_types entry); mapping it
    # to the first layer of the same kind lets every layer of that kind share one compilation.
    return config.layer_types.index(config.layer_types[index])


@functools.partial(jax.jit, static_argnames=("config",))
def _embed_step(embed_params, input_ids, *, config):
    return family_for(config.model_type).embed(embed_params, input_ids)


@functools.partial(jax.jit, static_argnames=("config", "layer_index", "branches"))
def _layer_step(layer, h, attention_mask, *, config, layer_index: int, branches: bool):
    family = family_for(config.model_type)
    ctx = family.attention_context(config, attention_mask.shape, attention_mask)
    h_next, y, m = family.decoder_layer(layer, config, layer_index, h, ctx)
    return (h_next, y, m) if branches else (h_next, None, None)


def walk_layers(params, config, input_ids, attention_mask, num_layers: int, branches_at=()):
    """``(k, h_k, Y_k, M_k)`` for k = 0..num_layers: ``h_0`` the embeddings, ``h_k`` the output of layer
    k-1, ``Y_k``/``M_k`` its residual after attention and MLP branch (only where k is in
    ``branches_at``, else None). One jitted step per layer, the family's ``decoder_layer`` with the
    layer's parameters as arguments; everything stays on the device and nothing waits for a step."""
    h = settle(_embed_step({"embed_tokens": params["embed_tokens"]}, input_ids, config=config))
    yield 0, h, None, None
    for k in range(num_layers):
        h, y, m = settle(_layer_step(params["layers"][k], h, attention_mask, config=config,
                                     layer_index=_canonical_layer(config, k), branches=k + 1 in branches_at))
        yield k + 1, h, y, m


# --- per-batch sums ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "final"))
def _distance_terms(h_start, h_end, attention_mask, norm_params, *, config, final: bool):
    """``[angular distance summed over sequences (last real token), ||h_start - h_end||^2 and ||h_end||^2
    summed over real tokens]`` of one block; ``final``: the distance compares the post-final-norm state."""
    lengths = attention_mask.sum(-1)
    last = jnp.maximum(lengths - 1, 0)
    real = (lengths > 0).astype(jnp.float32)
    rows = jnp.arange(h_start.shape[0])
    compared = family_for(config.model_type).final_norm(norm_params, config, h_end) if final else h_end
    distance = jnp.sum(angular_distance(h_start[rows, last], compared[rows, last]) * real)
    # what dropping the block costs every real token: ||h_start - h_end||^2 against ||h_end||^2
    token = attention_mask.astype(jnp.float32)
    h_start, h_end = h_start.astype(jnp.float32), h_end.astype(jnp.float32)
    return jnp.stack([distance, jnp.sum(token * jnp.sum((h_start - h_end) ** 2, -1)),
                      jnp.sum(token * jnp.sum(h_end * h_end, -1))])


def _gram_sums(m, target, h_end, w):
    mw = m * w[:, None]
    return (jnp.einsum("nd,ne->de", mw, m, precision=HIGHEST), jnp.einsum("nd,ne->de", mw, target, precision=HIGHEST),
            jnp.sum(w * jnp.sum(target * target, -1)), jnp.sum(w * jnp.sum(h_end * h_end, -1)),
            jnp.sum(w > 0).astype(jnp.float32))


def block_sums(m, y, h_end, attention_mask, rows: RowPolicy) -> dict:
    """One batch's normal-equation sums of one block, ``[groups, ...]`` (``GROUPS``: rest, first):
    A = M^T W M, B = M^T W (h_end - Y), and ``scalars`` = (sum ||target||^2, sum ||h_end||^2, rows)."""
    dim = m.shape[-1]
    m, y, h_end = (x.astype(jnp.float32) for x in (m, y, h_end))
    target = h_end - y
    rest_weight = rows.weights(attention_mask).at[:, 0].set(0.0).reshape(-1)
    first_weight = (attention_mask[:, 0] > 0).astype(jnp.float32)  # right padding: position 0 is real
    groups = []
    for rows_m, rows_target, rows_end, w in (
            (m.reshape(-1, dim), target.reshape(-1, dim), h_end.reshape(-1, dim), rest_weight),
            (m[:, 0], target[:, 0], h_end[:, 0], first_weight)):  # B rows only: cheap
        if rows.normalize:
            w = w / jnp.maximum(jnp.sum(rows_target * rows_target, -1), 1e-12)
        groups.append(_gram_sums(rows_m, rows_target, rows_end, w))
    a, b, target_sq, end_sq, count = zip(*groups)
    return {"A": jnp.stack(a), "B": jnp.stack(b),
            "scalars": jnp.stack([jnp.stack(v) for v in zip(target_sq, end_sq, count)])}


# --- device-resident Kahan accumulation -------------------------------------------------------------
#
# Why Kahan rather than float32 partial sums flushed to a float64 host sum every K batches: it needs no
# transfer at all until the sums are read (a flush is a sync and a D x D copy per block), its error does
# not grow with the number of batches (a partial sum's grows with K), and the state is two float32 arrays
# saved as they are, so a resumed run continues bitwise as the uninterrupted one. It costs a second
# float32 array per sum and four adds per element per batch, against the 2 N D^2 of the Gram product.


def _kahan(acc: dict, terms, batch_index) -> dict:
    """``acc`` ({"sum", "comp", "bad"}) plus ``terms``; ``bad`` keeps the first batch whose terms were not finite."""
    sums, treedef = jax.tree.flatten(acc["sum"])
    comps = treedef.flatten_up_to(acc["comp"])
    values = treedef.flatten_up_to(terms)
    new_sums, new_comps = [], []
    for s, c, x in zip(sums, comps, values):
        corrected = x - c
        t = s + corrected
        new_comps.append((t - s) - corrected)
        new_sums.append(t)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in values]))
    bad = jnp.where(finite, acc["bad"], jnp.minimum(acc["bad"], batch_index))
    return {"sum": treedef.unflatten(new_sums), "comp": treedef.unflatten(new_comps), "bad": bad}


def _add_distances(acc, terms, attention_mask, batch_index):
    new = {"terms": jnp.stack(terms, axis=1), "sequences": jnp.sum(attention_mask.sum(-1) > 0).astype(jnp.float32)}
    return _kahan(acc, new, batch_index)


def _add_block(acc, m, y, h_end, attention_mask, batch_index, rows: RowPolicy):
    return _kahan(acc, block_sums(m, y, h_end, attention_mask, rows), batch_index)


@functools.lru_cache(maxsize=8)
def _updates(mesh):
    """The jitted accumulator updates (accumulator donated); on a mesh their results are replicated,
    so that every process holds the whole state and reads it without a collective."""
    kwargs = {} if mesh is None else {"out_shardings": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    return (jax.jit(_add_distances, donate_argnums=0, **kwargs),
            jax.jit(_add_block, donate_argnums=0, static_argnames=("rows",), **kwargs))


def _read(x) -> np.ndarray:
    """A device array on this host: a replicated one is read from a local copy (no collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return gather_to_host(x)
    return np.asarray(x)


def _host_sum(acc: dict) -> dict:
    """float64 ``sum - compensation`` of an accumulator."""
    return jax.tree.map(lambda s, c: _read(s).astype(np.float64) - _read(c).astype(np.float64), acc["sum"], acc["comp"])


class _BlockView(Sequence):
    """The float64 normal equations of one (split, group) per block, read from the device on first access."""

    def __init__(self, owner: "StatsAccumulator", split: str, group: int):
        self.owner, self.split, self.group = owner, split, group

    def __len__(self):
        return len(self.owner.spec.stats_blocks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.owner._equations(self.split, i)[self.group]


class StatsAccumulator:
    """Sums of capture-step outputs, on the device (float32, Kahan): distances over every batch, normal
    equations per block, split (fit / held out) and row group (rest / first). Read on the host as
    float64 (``sums``, ``distances``, ...); ``state_dict`` is the exact state (sums and compensations)."""

    def __init__(self, spec: CaptureSpec, dim: int, mesh=None):
        self.spec = spec
        self.dim = dim
        self.mesh = mesh
        self.batches = 0
        starts = len(spec.distance_starts)
        self._distance_zeros = {"terms": np.zeros((3, starts), np.float32), "sequences": np.zeros((), np.float32)}
        self._block_zeros = {"A": np.zeros((len(GROUPS), dim, dim), np.float32),
                             "B": np.zeros((len(GROUPS), dim, dim), np.float32),
                             "scalars": np.zeros((len(GROUPS), 3), np.float32)}
        self._distances = self._new(self._distance_zeros) if starts else None
        # per split, one accumulator per block; a split's are allocated when its first batch comes
        self._blocks: dict[str, list | None] = {split: None for split in SPLITS}
        self._cache: dict = {}

    # device state

    def _put(self, array: np.ndarray) -> jax.Array:
        array = np.asarray(array)
        if self.mesh is None:
            return jnp.asarray(array)
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _new(self, zeros: dict, sums=None, comps=None, bad=NO_BAD_BATCH) -> dict:
        sums = zeros if sums is None else sums
        comps = zeros if comps is None else comps
        return {"sum": {k: self._put(v) for k, v in sums.items()}, "comp": {k: self._put(v) for k, v in comps.items()},
                "bad": self._put(np.asarray(bad, np.int32))}

    def _split_blocks(self, split: str) -> list:
        if self._blocks[split] is None:
            self._blocks[split] = [self._new(self._block_zeros) for _ in self.spec.stats_blocks]
        return self._blocks[split]

    def add_distances(self, terms: list, attention_mask, batch_index: int) -> None:
        """Add one batch's ``_distance_terms`` (one per distance start, in the spec's order)."""
        self._distances = settle(_updates(self.mesh)[0](self._distances, terms, attention_mask,
                                                        np.int32(batch_index)))
        self._cache.clear()

    def add_block(self, block_index: int, split: str, m, y, h_end, attention_mask, batch_index: int) -> None:
        """Add one batch's normal equations of block ``block_index`` (M, Y at its start, h at its end)."""
        blocks = self._split_blocks(split)
        blocks[block_index] = settle(_updates(self.mesh)[1](blocks[block_index], m, y, h_end, attention_mask,
                                                            np.int32(batch_index), rows=self.spec.rows))
        self._cache.clear()

    def wait(self) -> None:
        """Until every batch added so far is done on this process's devices."""
        jax.block_until_ready(self._accumulators())

    def check_finite(self) -> None:
        """NumericalError naming the first calibration batch whose statistics were not finite, if any."""
        flags = [acc["bad"] for acc in self._accumulators()]
        if flags:
            first = int(min(_read(f) for f in flags))
            if first != NO_BAD_BATCH:
                raise NumericalError(f"NaN/Inf in activations at calibration batch {first}")

    def _accumulators(self) -> list[dict]:
        accs = [self._distances] if self._distances is not None else []
        return accs + [acc for split in SPLITS for acc in (self._blocks[split] or [])]

    # host views (float64)

    def _equations(self, split: str, block_index: int) -> tuple[NormalEquations, NormalEquations]:
        key = (split, block_index)
        if key not in self._cache:
            if self._blocks[split] is None:
                self._cache[key] = tuple(NormalEquations.zeros(self.dim) for _ in GROUPS)
            else:
                host = _host_sum(self._blocks[split][block_index])
                self._cache[key] = tuple(
                    NormalEquations(host["A"][g], host["B"][g], *(float(v) for v in host["scalars"][g]))
                    for g in range(len(GROUPS)))
        return self._cache[key]

    @property
    def sums(self) -> dict:
        """``sums[split][group][block]``: float64 NormalEquations, read from the device when first indexed."""
        return {split: {group: _BlockView(self, split, g) for g, group in enumerate(GROUPS)} for split in SPLITS}

    def _distance_host(self) -> dict:
        if "distances" not in self._cache:
            self._cache["distances"] = (_host_sum(self._distances) if self._distances is not None else
                                        {k: v.astype(np.float64) for k, v in self._distance_zeros.items()})
        return self._cache["distances"]

    @property
    def distance_sum(self) -> np.ndarray:
        return self._distance_host()["terms"][0]

    @property
    def drop_sq(self) -> np.ndarray:
        return self._distance_host()["terms"][1]

    @property
    def end_sq(self) -> np.ndarray:
        return self._distance_host()["terms"][2]

    @property
    def sequences(self) -> float:
        return float(self._distance_host()["sequences"])

    def block_equations(self, block_index: int, split: str = "fit", first_token: bool | None = None) -> NormalEquations:
        """The normal equations of one block over a split, with or without the first-position rows
        (``first_token=None``: as the spec's row policy says)."""
        if first_token is None:
            first_token = not self.spec.rows.exclude_first_token
        rest, first = self._equations(split, block_index)
        return rest + first if first_token else rest.copy()

    @property
    def equations(self) -> list[NormalEquations]:
        """Fit-split equations of every block under the spec's row policy."""
        return [self.block_equations(i) for i in range(len(self.spec.stats_blocks))]

    # checkpointing: the exact device state (float32 sums and compensations), not the float64 view

    def state_dict(self) -> dict:
        # 1-element arrays: orbax saves arrays, not numpy scalars; orbax refuses zero-size arrays
        state = {"batches": np.array([self.batches], np.int64)}
        if self._distances is not None:
            acc = self._distances
            state["distance_sum"] = _read(acc["sum"]["terms"])
            state["distance_comp"] = _read(acc["comp"]["terms"])
            state["sequences"] = np.array([_read(acc["sum"]["sequences"]), _read(acc["comp"]["sequences"])])
            state["distance_bad"] = np.array([_read(acc["bad"])], np.int32)
        if self.spec.stats_blocks:
            every = [acc for split in SPLITS for acc in (self._blocks[split] or [None] * len(self.spec.stats_blocks))]
            for name, zeros in self._block_zeros.items():
                for part in ("sum", "comp"):
                    state[f"{name}_{part}"] = np.stack([zeros if acc is None else _read(acc[part][name])
                                                        for acc in every])
            state["blocks_bad"] = np.array([NO_BAD_BATCH if acc is None else _read(acc["bad"]) for acc in every],
                                           np.int32)
        return state

    def load_state(self, state: dict) -> None:
        self.batches = int(state["batches"][0])
        if self._distances is not None:
            sequences = np.asarray(state["sequences"], np.float32)
            self._distances = self._new(
                self._distance_zeros,
                {"terms": np.asarray(state["distance_sum"], np.float32), "sequences": sequences[0]},
                {"terms": np.asarray(state["distance_comp"], np.float32), "sequences": sequences[1]},
                int(state["distance_bad"][0]))
        if self.spec.stats_blocks:
            n = len(self.spec.stats_blocks)
            for s, split in enumerate(SPLITS):
                rows = range(s * n, (s + 1) * n)
                parts = {part: [{name: np.asarray(state[f"{name}_{part}"][i], np.float32) for name in self._block_zeros}
                                for i in rows] for part in ("sum", "comp")}
                used = any(np.any(p[name]) for part in parts.values() for p in part for name in p)
                self._blocks[split] = [self._new(self._block_zeros, parts["sum"][j], parts["comp"][j],
                                                 int(state["blocks_bad"][i])) for j, i in enumerate(rows)] \
                    if used else None
        self._cache.clear()

    def distances(self) -> dict[int, float]:
        if self.sequences == 0:
            raise NumericalError("no calibration sequence reached the distance pass")
        return {s: float(d / self.sequences) for s, d in zip(self.spec.distance_starts, self.distance_sum)}

    def drop_errors(self) -> dict[int, float]:
        """Relative error of dropping each candidate block without T, over every real token."""
        return {s: float(d / max(e, 1e-300)) for s, d, e in zip(self.spec.distance_starts, self.drop_sq, self.end_sq)}


def stats_bytes(num_blocks: int, dim: int) -> int:
    """Device float32 sums and Kahan compensations of A and B for every block (2 splits x 2 row groups);
    the float64 host copy of a block is made only when that block is read."""
    return num_blocks * 2 * dim * dim * (len(SPLITS) * len(GROUPS) * 2 * 4)


def _device_batch(batch, mesh):
    if mesh is None:
        return jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
    from replaceme_jax.sharding import put_batch

    return put_batch(batch.input_ids, mesh), put_batch(batch.attention_mask, mesh)


def capture_batch(params, config, spec: CaptureSpec, acc: StatsAccumulator, input_ids, attention_mask,
                  batch_index: int = 0, split: str = "fit") -> None:
    """Walk one batch through the layers ``spec`` needs and add its sums to ``acc``; on the device, with
    nothing waited for (each state is dropped as soon as no later sum needs it)."""
    if any(start < 1 for start, _ in spec.stats_blocks):
        raise ValueError(f"statistics blocks start at layer 1 or later, not {spec.stats_blocks}")
    n = spec.distance_n
    final = spec.reference_distance_state
    norm_params = {"norm": params["norm"]} if final else None
    block_starts = {start for start, _ in spec.stats_blocks}
    kept, branches, terms = {}, {}, [None] * len(spec.distance_starts)
    for k, h, y, m in walk_layers(params, config, input_ids, attention_mask, spec.num_layers_needed, block_starts):
        if k in spec.distance_starts:
            kept[k] = h
        if k in block_starts:
            branches[k] = (m, y)
        for j, s in enumerate(spec.distance_starts):
            if s + n == k:
                last = final and k == config.num_hidden_layers
                terms[j] = settle(_distance_terms(kept[s], h, attention_mask, norm_params if last else None,
                                                  config=config, final=last))
        for i, (start, end) in enumerate(spec.stats_blocks):
            if end == k:
                acc.add_block(i, split, *branches[start], h, attention_mask, batch_index)
        for s in [s for s in kept if s + n <= k]:
            del kept[s]
        for s in [s for s in branches if all(e <= k for b, e in spec.stats_blocks if b == s)]:
            del branches[s]
    if spec.distance_starts:
        acc.add_distances(terms, attention_mask, batch_index)


def run_capture(params, config, spec: CaptureSpec, batches: Iterable, progress=None, mesh=None,
                checkpoint=None, heldout_batches: Iterable = ()) -> StatsAccumulator:
    """Stream ``spec``'s statistics over ``batches`` and then ``heldout_batches`` (whose normal
    equations are kept apart, to validate a fit; distances count every batch). With a ``mesh`` each
    batch is split over its batch axes and the sums are reduced across devices (and hosts) inside the
    jitted steps. With a ``checkpoint`` (a ``checkpointing.PassState``) the sums are saved every few
    batches and a rerun continues from the last save. The only device-to-host transfers are those
    saves and the final reads."""
    acc = StatsAccumulator(spec, config.hidden_size, mesh=mesh)
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
            capture_batch(params, config, spec, acc, ids, mask, index, split)
            acc.batches += 1
            if checkpoint is not None:
                if jax.process_count() > 1:
                    # Dispatch does not wait for the batch; with several processes each waits here (no
                    # transfer), so that one that stops after this point leaves the others able to finish
                    # the batch's collectives and process 0 able to save it.
                    acc.wait()
                checkpoint.save(index + 1, acc.state_dict)  # built only when a save is due
            if progress is not None:
                progress.update(1)
    acc.check_finite()
    return acc


# --- rows for the cosine solver -------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rows",))
def _rows_out(m, y, h_end, attention_mask, rows: RowPolicy):
    dim = m.shape[-1]
    return {"M": m.astype(jnp.float32).reshape(-1, dim), "Y": y.astype(jnp.float32).reshape(-1, dim),
            "h_end": h_end.astype(jnp.float32).reshape(-1, dim), "weight": rows.weights(attention_mask).reshape(-1)}


def rows_step(params, config, block: tuple[int, int], rows: RowPolicy, input_ids, attention_mask):
    """M, Y (at the block's start) and h_end rows of one batch, with their weights; on the device."""
    start, end = block
    for k, h, y, m in walk_layers(params, config, input_ids, attention_mask, end, (start,)):
        if k == start:
            branch = (m, y)
    return _rows_out(*branch, h, attention_mask, rows=rows)


def collect_rows(params, config, block, rows: RowPolicy, batches: Iterable, max_rows: int, seed: int = 0,
                 progress=None, mesh=None) -> dict[str, np.ndarray]:
    """M, Y, h_end rows of one block (rows with weight > 0), at most ``max_rows`` (a uniform reservoir)."""
    rng = np.random.default_rng(seed)
    dim = config.hidden_size
    store = {k: np.empty((max_rows, dim), np.float32) for k in ("M", "Y", "h_end")}
    seen = 0
    with jax.default_matmul_precision("highest"):
        for index, batch in enumerate(batches):
            interrupt.check()
            ids, mask = _device_batch(batch, mesh)
            out = gather_to_host(rows_step(params, config, tuple(block), rows, ids, mask))
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
