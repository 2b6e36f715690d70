"""``dataset: self``: calibration text sampled from the model itself, so compression needs no data set.

The sampler is ``replaceme_jax.generate`` (a jitted KV-cache loop over any family in ``models/``); this
module turns it into calibration sequences: start tokens and seed prompts, fixed-shape batches of
rows, seeds, progress. ``generate`` (and with it JAX) is imported on first use, so that the data
package, which config validation imports, loads no JAX.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.progress import progress_bar
from replaceme_jax.tokens import pad_token_id

DEFAULT_SIZE = 128  # samples drawn when no size is given


def _prompt_ids(tokenizer, prompts: Sequence[str] | None) -> list[list[int]]:
    from replaceme_jax.generate import start_token_id

    start = start_token_id(tokenizer)
    if not prompts:
        return [[start]]
    out = []
    for text in prompts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        out.append([start] + ids)
    return out


def sample_texts(
    params,
    config,
    tokenizer,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    prompts: Sequence[str] | None = None,
    min_new_tokens: int = 0,
) -> list[np.ndarray]:
    """``num_samples`` token sequences (int32) sampled from the model (``params``, its family
    ``config``), for calibration.

    Each starts with the start token (BOS, else EOS) followed by a seed prompt (``prompts`` used in
    turn; none by default) and holds up to ``max_new_tokens`` new tokens, ending early at EOS. Batches
    have a fixed shape (the last is filled up with extra rows that are dropped), so one compilation
    serves the whole run. The same ``seed`` gives the same samples.
    """
    import jax

    from replaceme_jax.generate import Sampling, generate

    if num_samples < 1 or batch_size < 1:
        raise ReplaceMeError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens)
    prompt_ids = _prompt_ids(tokenizer, prompts)
    eos_ids = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    pad_id = pad_token_id(tokenizer)
    key = jax.random.key(seed)
    samples: list[np.ndarray] = []
    batches = range(0, num_samples, batch_size)
    with progress_bar(total=len(batches) * max_new_tokens, desc="sampling calibration text", unit="step") as bar:
        for batch_index, first in enumerate(batches):
            rows = [prompt_ids[(first + r) % len(prompt_ids)] for r in range(batch_size)]
            tokens, lengths = generate(params, config, rows, max_new_tokens, jax.random.fold_in(key, batch_index),
                                       sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, progress=bar.update)
            for r in range(min(batch_size, num_samples - first)):
                samples.append(tokens[r, : lengths[r]].copy())
            bar.update(bar.total * (batch_index + 1) // len(batches) - bar.n)  # rows that stopped early
    return samples


def decode_samples(tokenizer, samples: Sequence[np.ndarray], skip_special_tokens: bool = True) -> list[str]:
    """The samples as text."""
    return [tokenizer.decode(np.asarray(s).tolist(), skip_special_tokens=skip_special_tokens) for s in samples]


def self_generated_sequences(
    tokenizer,
    max_length: int,
    size: int | None = None,
    *,
    params=None,
    config=None,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 16,
    prompts: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """``size`` (default 128) calibration sequences of at most ``max_length`` tokens sampled from the
    model; the start token and seed prompt count towards ``max_length``."""
    if params is None or config is None:
        raise ReplaceMeError("dataset 'self' needs the model (params and config) to sample from")
    num = size or DEFAULT_SIZE
    samples = sample_texts(params, config, tokenizer, num_samples=num, max_new_tokens=max(1, max_length - 1),
                           batch_size=min(batch_size, num), seed=seed, temperature=temperature, top_k=top_k,
                           top_p=top_p, prompts=prompts)
    return [s[:max_length] for s in samples if len(s)]
