"""Token ids of calibration texts: truncation to ``max_length`` and the BOS policy.

The pad id (``pad_token_id``) lives in ``replaceme_jax.tokens``, shared with generation, and is
re-exported by ``replaceme_jax.data``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from replaceme_jax.errors import ReplaceMeError


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int, add_bos: bool | None = None) -> list[np.ndarray]:
    """Token ids of each text as int32 arrays, truncated to ``max_length``; empty results are dropped.

    ``add_bos``: None keeps the tokenizer's own special tokens (what the reference does: Llama 3 adds
    BOS, SmolLM2 and Qwen add nothing); True makes every sequence start with exactly one BOS (also when
    a chat template already wrote one); False adds no special tokens.
    """
    if max_length <= 0:
        raise ReplaceMeError(f"max_length must be positive, got {max_length}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ReplaceMeError("add_bos is set but the tokenizer has no BOS token")
    encoded = tokenizer(list(texts), add_special_tokens=add_bos is None, truncation=True,
                        max_length=max_length)["input_ids"]
    out = []
    for ids in encoded:
        if add_bos and (not ids or ids[0] != bos):
            ids = [bos] + list(ids)
        if ids:
            out.append(np.asarray(ids[:max_length], dtype=np.int32))
    if not out:
        raise ReplaceMeError("no tokens left after tokenization (all texts empty)")
    return out
