"""The calibration entry points: a data spec (one source, ``self`` or a mixture) -> token sequences ->
batches, and the held-out split that validates a fit.

``load_calibration`` reads texts (``sources``) and tokenizes them (``tokenizing``), or samples the model
(``self_generated``); ``make_batches`` (``batching``) groups the sequences. ``calibration_batches``
does both for a run config: any object with the data keys of ``replaceme_jax.config.DataConfig``
(``compress`` and ``experts`` share them).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from replaceme_jax.data.batching import Batches, make_batches
from replaceme_jax.data.self_generated import DEFAULT_SIZE, self_generated_sequences
from replaceme_jax.data.sources import SELF_DATASET, load_texts, mixture_counts, parse_mixture
from replaceme_jax.data.tokenizing import tokenize_texts
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.tokens import pad_token_id

log = logging.getLogger(__name__)


def load_calibration(
    dataset: str | Sequence[Mapping[str, Any]],
    tokenizer,
    max_length: int,
    *,
    size: int | None = None,
    column: str | None = None,
    subset: str | None = None,
    split: str | None = None,
    chat_format: str | None = None,
    add_bos: bool | None = None,
    params=None,
    config=None,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generation_batch_size: int = 16,
    prompts: Sequence[str] | None = None,
    summary: list | None = None,
) -> list[np.ndarray]:
    """Calibration token sequences (int32, at most ``max_length`` long); batch them with ``make_batches``.

    ``dataset="self"`` samples ``size`` (default 128) sequences of ``max_length`` tokens from the model
    itself (``params``/``config`` required; ``seed``, ``temperature``, ``top_k``, ``top_p``,
    ``prompts`` as in ``self_generated.sample_texts``), so compression needs no data at all. Anything else is
    read with ``load_texts`` and tokenized with ``tokenize_texts``.

    ``dataset`` may also be a mixture (see ``parse_mixture``): ``size`` sequences split over the
    sources by ratio, each source read as above (``self`` included), then shuffled together with
    ``seed`` so every batch mixes sources. ``summary`` (a list) receives one dict per source with the
    sequences and tokens it gave.
    """
    if not isinstance(dataset, str):
        sources = parse_mixture(dataset)
        counts = mixture_counts([s.ratio for s in sources], size or DEFAULT_SIZE)
        sequences, parts = [], summary if summary is not None else []
        for source, count in zip(sources, counts):
            got = load_calibration(
                source.dataset, tokenizer, max_length, size=count,
                column=source.dataset_column if source.dataset_column is not None else column,
                split=source.dataset_subset if source.dataset_subset is not None else split,
                chat_format=source.chat_format if source.chat_format is not None else chat_format,
                add_bos=add_bos, params=params, config=config, seed=seed, temperature=temperature, top_k=top_k,
                top_p=top_p, generation_batch_size=generation_batch_size, prompts=prompts, summary=parts)
            parts[-1]["ratio"] = source.ratio
            log.info("calibration source %s: %d sequences, %d tokens (ratio %g)", source.dataset, len(got),
                     parts[-1]["tokens"], source.ratio)
            sequences.extend(got)
        order = np.random.default_rng(seed).permutation(len(sequences))
        return [sequences[i] for i in order]
    if dataset == SELF_DATASET:
        sequences = self_generated_sequences(tokenizer, max_length, size, params=params, config=config, seed=seed,
                                             temperature=temperature, top_k=top_k, top_p=top_p,
                                             batch_size=generation_batch_size, prompts=prompts)
    else:
        texts = load_texts(dataset, column=column, subset=subset, split=split, size=size, chat_format=chat_format,
                           tokenizer=tokenizer)
        sequences = tokenize_texts(tokenizer, texts, max_length, add_bos=add_bos)
    if summary is not None:
        summary.append({"dataset": dataset, "ratio": 1.0, "requested": size, "sequences": len(sequences),
                        "tokens": int(sum(map(len, sequences)))})
    return sequences


def split_heldout(sequences: Sequence[np.ndarray], fraction: float, minimum: int, seed: int = 0
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out whole sequences (documents, never rows of one) to validate a fit: ``max(minimum,
    round(fraction * n))`` of them, drawn with ``seed``; the rest keep their order. ``fraction=0``
    holds out nothing."""
    sequences = list(sequences)
    if fraction <= 0:
        return sequences, []
    n = len(sequences)
    k = max(minimum, round(fraction * n))
    if n - k < k:
        raise ReplaceMeError(
            f"too little calibration data to validate the fit: {n} sequences, and {k} are held out "
            f"(need at least {2 * k}; raise dataset_size, or set validation_fraction: 0 with a numeric alpha "
            f"and first_token_rows include|exclude)")
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return ([s for i, s in enumerate(sequences) if i not in held], [s for i, s in enumerate(sequences) if i in held])


def calibration_sequences(cfg, tokenizer, params=None, config=None) -> tuple[list[np.ndarray], tuple[dict, ...]]:
    """Token sequences for a run config (``compress`` or ``experts``), and what each data source gave."""
    sources: list[dict] = []
    sequences = load_calibration(
        cfg.dataset, tokenizer, cfg.max_length, size=cfg.dataset_size, column=cfg.dataset_column,
        split=cfg.dataset_subset, chat_format=cfg.chat_format, params=params, config=config, seed=cfg.seed,
        temperature=cfg.self_temperature, top_k=cfg.self_top_k, top_p=cfg.self_top_p,
        generation_batch_size=cfg.self_batch_size, summary=sources)
    return sequences, tuple(sources)


def batches_for(cfg, sequences: Sequence[np.ndarray], tokenizer, sources: tuple[dict, ...] = ()) -> Batches:
    """``make_batches`` with a run config's batch size, length and bucketing."""
    batches = make_batches(sequences, cfg.batch_size, cfg.max_length, pad_token_id(tokenizer), bucket=cfg.bucket,
                           sort_by_length=cfg.sort_by_length)
    return dataclasses.replace(batches, sources=sources)


def calibration_batches(cfg, tokenizer, params=None, config=None) -> Batches:
    """Batches for a run config (``compress`` or ``experts``): its data keys, ``self`` sampling keys,
    bucketing and seed. ``Batches.sources`` records what each source of the data gave."""
    sequences, sources = calibration_sequences(cfg, tokenizer, params, config)
    return batches_for(cfg, sequences, tokenizer, sources)
