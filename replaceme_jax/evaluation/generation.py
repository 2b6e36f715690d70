"""Greedy generation in the evaluator: continuations of a prompt file side by side, exact-match tasks.

Decoding is the jitted KV-cache sampler of ``replaceme_jax.generate`` at temperature 0 (argmax). It
only ever builds the logits of the last position of each row, ``[rows, vocab]`` float32 (19 MB for
32 rows of a 151,936 vocabulary), so its memory does not grow with the prompt length.

Conventions:

- A prompt is tokenised as a user of ``transformers`` would tokenise it for ``generate``: with the
  tokenizer's own special tokens (SmolLM2 and Qwen add none, Llama 3 adds BOS). An empty prompt becomes
  the start token (BOS, else EOS).
- A row stops at EOS or after ``max_new_tokens`` tokens; the continuation is decoded without special
  tokens.
- Exact match (``exact_match``): the continuation's first non-empty line and the answer agree after
  case folding, collapsing whitespace and dropping a trailing ``.,;:!?``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from replaceme_jax.tokens import pad_token_id
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.generate import Sampling, generate, start_token_id
from replaceme_jax.progress import progress_bar

GENERATE_ROWS = 32  # prompts decoded together; a prompt file of up to this many compiles once
EXACT_MATCH_NEW_TOKENS = 16  # enough for every bundled answer and the newline after it


@dataclasses.dataclass
class Generations:
    """Greedy continuations of a list of prompts, in the prompts' order, and what throughput needs."""

    texts: list[str]
    new_tokens: int  # tokens generated over all rows (EOS included)
    seconds: float  # wall time, compilation included

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with the tokenizer's own special tokens; the start token if it has none."""
    ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    return ids or [start_token_id(tokenizer)]


def greedy_continuations(params, config, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                         rows: int = GENERATE_ROWS, progress: bool = False, desc: str = "generate") -> Generations:
    """Greedy continuation of each prompt, up to ``max_new_tokens`` tokens or EOS.

    Prompts are decoded ``rows`` at a time, sorted by length so that a batch shares most of its prefill.
    """
    if max_new_tokens < 1:
        raise ReplaceMeError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    for i, tokens in enumerate(ids):
        if max(tokens) >= config.vocab_size or min(tokens) < 0:
            raise ReplaceMeError(f"prompt {i + 1}: token id outside the model's vocabulary of {config.vocab_size}")
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = pad_token_id(tokenizer)
    order = np.argsort([len(t) for t in ids], kind="stable")
    texts: list[str] = [""] * len(ids)
    new_tokens = 0
    start = time.perf_counter()
    with progress_bar(len(ids), desc, unit="prompt", enabled=progress, leave=False) as bar:
        for first in range(0, len(ids), rows):
            batch = [int(i) for i in order[first:first + rows]]
            tokens, lengths = generate(params, config, [ids[i] for i in batch], max_new_tokens, jax.random.key(0),
                                       sampling=Sampling(temperature=0.0), eos_ids=[eos] if eos is not None else [],
                                       pad_id=pad)
            for row, i in enumerate(batch):
                new = tokens[row, len(ids[i]):lengths[row]].tolist()
                new_tokens += len(new)
                texts[i] = tokenizer.decode(new, skip_special_tokens=True)
            bar.update(len(batch))
    return Generations(texts, new_tokens, time.perf_counter() - start)


def normalize_answer(text: str) -> str:
    """The first non-empty line, case-folded, whitespace collapsed, without a trailing ``.,;:!?``."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return " ".join(line.split()).rstrip(".,;:!?").strip().casefold()


def exact_match(continuation: str, answer: str) -> bool:
    return normalize_answer(continuation) == normalize_answer(answer)
