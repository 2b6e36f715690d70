"""Calibration data: texts from a data set (or from the model itself), token ids, and fixed-shape batches.

The pipeline is ``load_calibration`` (texts -> token ids, or self-generated ids for ``dataset: self``)
followed by ``make_batches``; ``calibration_batches(cfg)`` does both for a ``compress`` or ``experts``
run config. One module per job:

- ``sources``: local files and Hub data sets, columns, chat formats (SlimOrca), mixtures, ``check_sources``
- ``tokenizing``: texts -> int32 token ids (truncation, BOS)
- ``batching``: ``Batch``/``Batches``, length buckets, ``make_batches``
- ``self_generated``: ``dataset: self``, text sampled from the model with ``replaceme_jax.generate``
- ``calibration``: the entry points (``load_calibration``, ``calibration_sequences``,
  ``split_heldout``, ``batches_for``, ``calibration_batches``)

The public names of all five are importable from here. A test that monkeypatches a helper must patch
it in the module that calls it (``replaceme_jax.data.sources._hub_reachable``): private names are not
re-exported, so a patch on this package fails instead of silently patching nothing.
"""

from replaceme_jax.data.batching import BUCKETS, MIN_BUCKET, Batch, Batches, bucket_length, make_batches
from replaceme_jax.data.calibration import (
    batches_for,
    calibration_batches,
    calibration_sequences,
    load_calibration,
    split_heldout,
)
from replaceme_jax.data.self_generated import decode_samples, sample_texts, self_generated_sequences
from replaceme_jax.data.sources import (
    CHAT_FORMATS,
    LOCAL_BUILDERS,
    SELF_DATASET,
    DataSource,
    check_sources,
    format_dialog,
    load_texts,
    mixture_counts,
    parse_mixture,
    slimorca_dialog,
)
from replaceme_jax.data.tokenizing import tokenize_texts
from replaceme_jax.tokens import pad_token_id

__all__ = [
    "BUCKETS", "CHAT_FORMATS", "LOCAL_BUILDERS", "MIN_BUCKET", "SELF_DATASET",
    "Batch", "Batches", "DataSource",
    "batches_for", "bucket_length", "calibration_batches", "calibration_sequences", "check_sources",
    "decode_samples", "format_dialog", "load_calibration", "load_texts", "make_batches", "mixture_counts",
    "pad_token_id", "parse_mixture", "sample_texts", "self_generated_sequences", "slimorca_dialog",
    "split_heldout", "tokenize_texts",
]
