"""Calibration passes that feed the expert statistics, one layer at a time.

``LayerwiseCalibration`` advances the residual stream of every calibration batch one layer at a
time, so a layer can be compressed before the next layer's statistics are gathered (REAM's
sequential mode) and only one layer's activations live on the device. Between layers the streams
wait in files of a temporary directory (``ResidualStreams``), not in memory: the process holds one
batch's stream at a time, so peak memory does not grow with the number of calibration tokens (the
disk holds two layers' worth, ``2 x tokens x hidden_size`` values of the model's dtype).
``collect_statistics`` is the one-call version for the unmodified model.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from replaceme_jax import interrupt
from replaceme_jax.experts.stats import ExpertStats, init_stats, update_stats
from replaceme_jax.models import llama, moe
from replaceme_jax.models.common import Params
from replaceme_jax.models.moe import MoeConfig
from replaceme_jax.sharding import gather_to_host, put_batch


def _canonical_layer(config: MoeConfig, index: int) -> int:
    # The layer index only selects the attention window; mapping it to the first layer of the same kind
    # lets every layer share one compilation per batch shape.
    return config.layer_types.index(config.layer_types[index])


@functools.partial(jax.jit, static_argnames=("config", "layer_index", "dispatch", "with_x"))
def _layer_step(layer: dict, stats: ExpertStats | None, h: jax.Array, attention_mask: jax.Array, *,
                config: MoeConfig, layer_index: int, dispatch: str, with_x: bool):
    ctx = llama.attention_context(config, attention_mask.shape, attention_mask)
    h_next, _, _, aux = moe.decoder_layer_with_aux(layer, config, layer_index, h, ctx, dispatch=dispatch)
    if stats is not None:
        stats = update_stats(stats, aux, attention_mask.reshape(-1).astype(bool))
    return h_next, stats, (aux.x if with_x else None)


class ResidualStreams:
    """One layer's residual streams ``[B, S, D]``, one file per batch in ``directory``.

    Written whole with ``tofile`` and read back whole with ``fromfile``: no memory map, so what was read
    does not stay mapped into the process (the page cache is the kernel's, not the process's RSS).
    Iterating yields the batches in order; ``discard`` deletes the files.
    """

    def __init__(self, directory: Path, name: str):
        self.directory, self.name = Path(directory), name
        self._layouts: list[tuple[tuple[int, ...], np.dtype]] = []

    def _path(self, index: int) -> Path:
        return self.directory / f"{self.name}-{index:06d}.bin"

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        array.tofile(self._path(len(self._layouts)))
        self._layouts.append((array.shape, array.dtype))

    def __len__(self) -> int:
        return len(self._layouts)

    def __getitem__(self, index: int) -> np.ndarray:
        shape, dtype = self._layouts[index]
        return np.fromfile(self._path(index), dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def discard(self) -> None:
        for i in range(len(self)):
            self._path(i).unlink(missing_ok=True)
        self._layouts = []


class LayerwiseCalibration:
    """The residual streams ``h_l`` of a set of batches, advanced layer by layer.

    ``batches``: (input_ids, attention_mask) pairs. ``sample_tokens``: how many real tokens to sample
    (the same positions at every layer) for statistics that run every expert (REAM). ``mesh``: each
    batch is split over the mesh's batch axes (``sharding.put_batch``), and the layer runs with its
    parameters as they are placed (e.g. by ``sharding.shard_params``); the statistics are sums over
    tokens, which XLA reduces across devices.

    The streams live in a temporary directory under ``spill_dir`` (default: ``tempfile``'s, i.e.
    ``$TMPDIR``), removed by ``close()`` (or on leaving a ``with`` block).
    """

    def __init__(self, params: Params, config: MoeConfig, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                 dispatch: str = "auto", sample_tokens: int = 0, seed: int = 0, mesh=None,
                 spill_dir: str | Path | None = None):
        self.config = config
        self.dispatch = dispatch
        self.mesh = mesh
        self._tmp = tempfile.TemporaryDirectory(prefix="replaceme-experts-", dir=spill_dir)
        self._generation = 0
        self._pending: ResidualStreams | None = None  # the outputs ``statistics`` gave last
        self.masks = []
        self.hidden = self._new_streams()
        for ids, mask in batches:
            self.masks.append(np.asarray(mask, np.int32))
            self.hidden.append(gather_to_host(llama.embed(params, self._put(np.asarray(ids, np.int32)))))
        self.layer = 0
        self.sample_index = self._choose_sample(sample_tokens, seed)

    def _new_streams(self) -> ResidualStreams:
        self._generation += 1
        return ResidualStreams(Path(self._tmp.name), f"h{self._generation}")

    def close(self) -> None:
        """Delete the spilled streams (the object is unusable afterwards)."""
        self._tmp.cleanup()

    def __enter__(self) -> "LayerwiseCalibration":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, array: np.ndarray) -> jax.Array:
        return jnp.asarray(array) if self.mesh is None else put_batch(array, self.mesh)

    def _choose_sample(self, n: int, seed: int) -> list[np.ndarray] | None:
        if n <= 0:
            return None
        flat = [np.flatnonzero(m.reshape(-1)) for m in self.masks]
        total = sum(len(f) for f in flat)
        chosen = np.sort(np.random.default_rng(seed).permutation(total)[: min(n, total)])
        out, offset = [], 0
        for f in flat:
            out.append(f[chosen[(chosen >= offset) & (chosen < offset + len(f))] - offset])
            offset += len(f)
        return out

    @property
    def num_tokens(self) -> int:
        return int(sum(m.sum() for m in self.masks))

    def _run(self, layer: dict, config: MoeConfig, stats: ExpertStats | None, want_sample: bool,
             progress: Callable[[], None] | None):
        outputs, samples = self._new_streams(), []
        index = _canonical_layer(config, self.layer)
        with_x = want_sample and self.sample_index is not None
        for b, (h, mask) in enumerate(zip(self.hidden, self.masks)):
            interrupt.check()
            h_next, stats, x = _layer_step(layer, stats, self._put(h), self._put(mask), config=config,
                                           layer_index=index, dispatch=self.dispatch, with_x=with_x)
            del h
            outputs.append(gather_to_host(h_next))
            if with_x and len(self.sample_index[b]):
                samples.append(gather_to_host(jnp.take(x, jnp.asarray(self.sample_index[b]), axis=0)))
            if progress is not None:
                progress()
        sample = np.concatenate(samples) if samples else None
        return outputs, stats, sample

    def statistics(self, layer: dict, *, want_sample: bool = False,
                   progress: Callable[[], None] | None = None) -> tuple[ExpertStats, np.ndarray | None,
                                                                         ResidualStreams]:
        """Statistics of the current layer (params ``layer``) over every batch, the sampled MoE inputs
        ``[Ns, D]`` (if asked), and the layer's outputs (pass them to ``advance`` to keep them; they are
        discarded when ``advance`` recomputes the outputs through another layer)."""
        e = layer["mlp"]["gate"]["kernel"].shape[-1]
        stats = init_stats(e, self.config.hidden_size)
        outputs, stats, sample = self._run(layer, self.config, stats, want_sample, progress)
        self._pending = outputs
        return stats, sample, outputs

    def advance(self, layer: dict | None = None, outputs: ResidualStreams | None = None,
                progress: Callable[[], None] | None = None) -> None:
        """Move to the next layer, through ``layer`` (params, any expert count) or with given ``outputs``."""
        pending, self._pending = self._pending, None
        if outputs is None:
            if pending is not None:
                pending.discard()  # the uncompressed layer's outputs: the compressed layer replaces them
            config = self.config.with_experts(int(layer["mlp"]["gate"]["kernel"].shape[-1]))
            outputs, _, _ = self._run(layer, config, None, False, progress)
        self.hidden.discard()
        self.hidden = outputs
        self.layer += 1


def collect_statistics(params: Params, config: MoeConfig, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                       dispatch: str = "auto") -> list[ExpertStats]:
    """Statistics of every layer of the unmodified model over ``batches``."""
    out = []
    with LayerwiseCalibration(params, config, batches, dispatch=dispatch) as run:
        for layer in params["layers"]:
            stats, _, outputs = run.statistics(layer)
            out.append(stats)
            run.advance(outputs=outputs)
    return out
