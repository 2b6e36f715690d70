#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint to Flax params (an orbax checkpoint this tool and JAX code read).

    python conversion/hf_to_flax.py SRC DST [--dtype float32|bfloat16|float16] [--overwrite]

SRC is an HF model directory, a GGUF file, or a built-in name (``smollm2-135m``). DST receives
``params/`` (orbax), ``replaceme_jax.json`` (the source config) and ``tokenizer/``. This runs the same
code as ``replaceme-jax convert SRC DST --format orbax``; load the result in Python with
``replaceme_jax.from_pretrained(DST)``.
"""

import sys

from replaceme_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--format", "orbax"]))
