"""Special token ids, shared by data preparation and generation (neither imports the other)."""

from __future__ import annotations


def pad_token_id(tokenizer) -> int:
    """The pad id: the tokenizer's pad token, else EOS (as the reference does), else 0.

    Which id pads does not change any result here (pads are masked); it only matters to reproduce a
    reference run that fits on pad rows too.
    """
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0
