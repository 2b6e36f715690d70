"""Block selection from the angular-distance profile."""

from __future__ import annotations

from typing import Mapping

from replaceme_jax.errors import UsageError


def candidate_starts(num_layers: int, n: int, min_start: int | None = None) -> list[int]:
    """Starts ``s`` of blocks ``(s, s + n)``; layer 0 is never removed."""
    if n >= num_layers:
        raise UsageError(f"layers_to_skip={n} must be smaller than the model's {num_layers} layers")
    first = max(1, min_start or 1)
    starts = list(range(first, num_layers - n + 1))
    if not starts:
        raise UsageError(f"no block of {n} layers starts at or after layer {first} in a {num_layers}-layer model")
    return starts


def select_blocks(distances: Mapping[int, float], n: int, num_blocks: int = 1,
                  merge_consecutive: bool = True) -> list[tuple[int, int]]:
    """Greedy non-overlapping choice of ``num_blocks`` blocks of ``n`` layers by increasing distance.

    Returns ``[(start, end), ...]`` sorted by start, end exclusive, in original layer numbers. With
    ``merge_consecutive`` blocks that touch (one's end is the next one's start) become one block.
    """
    chosen: list[tuple[int, int]] = []
    for start in sorted(distances, key=lambda s: (distances[s], s)):
        end = start + n
        if all(end <= s or start >= e for s, e in chosen):
            chosen.append((start, end))
            if len(chosen) == num_blocks:
                break
    if len(chosen) < num_blocks:
        raise UsageError(f"cannot place {num_blocks} non-overlapping blocks of {n} layers "
                         f"(only {len(chosen)} fit)")
    return merge_touching(chosen) if merge_consecutive else sorted(chosen)


def merge_touching(blocks) -> list[tuple[int, int]]:
    """``blocks`` sorted by start, with blocks that touch (one's end is the next one's start) made one."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(tuple(block) for block in blocks):
        if merged and start == merged[-1][1]:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
