"""Fixed-shape batches: token sequences right-padded to ``[batch_size, L]``, ``L`` from a few buckets.

Rounding lengths up to a few bucket lengths means a run over a thousand documents compiles a handful of
shapes rather than one per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError

BUCKETS = ("pow2", "longest")  # or an int: round lengths up to a multiple of it
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Batch:
    """One right-padded batch. Rows past ``n_real_rows`` are empty (mask all zeros) fillers."""

    input_ids: np.ndarray  # [B, S] int32
    attention_mask: np.ndarray  # [B, S] int32
    n_real_rows: int
    rows: tuple[int, ...]  # index in the input sequence list of each real row

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclasses.dataclass(frozen=True)
class Batches:
    """The batches of a calibration set plus its totals; iterate over it for the batches."""

    batches: tuple[Batch, ...]
    num_tokens: int  # real (non-pad) tokens
    num_sequences: int
    sources: tuple[dict, ...] = ()  # per data source: dataset, ratio, sequences, tokens

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Distinct batch shapes in order of first use (each is one compilation of a jitted step)."""
        return list(dict.fromkeys(b.input_ids.shape for b in self.batches))

    @property
    def padding_fraction(self) -> float:
        total = sum(b.input_ids.size for b in self.batches)
        return 1.0 - self.num_tokens / total if total else 0.0


def bucket_length(length: int, max_length: int, bucket: int | str = "pow2") -> int:
    """The padded length for a batch whose longest row has ``length`` tokens.

    ``"pow2"``: the next power of two (at least 16); an int: the next multiple of it; ``"longest"``:
    ``length`` itself (the reference's ``padding="longest"``; one shape per distinct length). Never
    more than ``max_length``.
    """
    if bucket == "longest":
        padded = length
    elif bucket == "pow2":
        padded = max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())
    elif isinstance(bucket, int) and not isinstance(bucket, bool) and bucket > 0:
        padded = -(-length // bucket) * bucket
    else:
        raise ReplaceMeError(f"unknown bucket {bucket!r} (use {' or '.join(map(repr, BUCKETS))} or a positive int)")
    return max(1, min(padded, max_length))


def make_batches(
    sequences: Sequence[np.ndarray],
    batch_size: int,
    max_length: int,
    pad_id: int,
    bucket: int | str = "pow2",
    sort_by_length: bool = True,
    drop_last: bool = False,
) -> Batches:
    """Group token sequences into right-padded ``[batch_size, L]`` batches, ``L`` from a few buckets.

    Sequences longer than ``max_length`` are truncated. With ``sort_by_length`` (the default) rows are
    ordered longest first, so each batch holds similar lengths (little padding) and the largest shape
    runs first (an out-of-memory shows at once); ties keep input order, so the result is deterministic.
    Every batch has ``batch_size`` rows: the last is completed with empty rows (mask all zeros) so the
    step function sees no new batch dimension. ``drop_last`` drops an incomplete last batch instead
    (the reference's DataLoader does).
    """
    if batch_size <= 0:
        raise ReplaceMeError(f"batch_size must be positive, got {batch_size}")
    seqs = [np.asarray(s, dtype=np.int32)[:max_length] for s in sequences]
    order = [i for i in range(len(seqs)) if len(seqs[i]) > 0]
    if not order:
        raise ReplaceMeError("no calibration sequences to batch (all empty)")
    if sort_by_length:
        order.sort(key=lambda i: -len(seqs[i]))  # list.sort is stable
    if drop_last:
        order = order[: len(order) - len(order) % batch_size]
        if not order:
            raise ReplaceMeError(f"fewer calibration sequences than batch_size={batch_size} with drop_last")

    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = bucket_length(max(len(seqs[i]) for i in rows), max_length, bucket)
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
            n = len(seqs[i])
            ids[r, :n] = seqs[i]
            mask[r, :n] = 1
        batches.append(Batch(input_ids=ids, attention_mask=mask, n_real_rows=len(rows), rows=tuple(rows)))
    num_tokens = sum(len(seqs[i]) for i in order)
    return Batches(batches=tuple(batches), num_tokens=num_tokens, num_sequences=len(order))
