#!/usr/bin/env python3
"""Convert Flax params back to a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    python conversion/flax_to_hf.py SRC DST [--dtype float32|bfloat16|float16] [--overwrite]

SRC is an orbax checkpoint written by ``hf_to_flax.py`` (or ``replaceme-jax convert --format orbax``).
DST receives safetensors shards (with an index when sharded), ``config.json`` and the tokenizer. This
runs the same code as ``replaceme-jax convert SRC DST --format hf``.
"""

import sys

from replaceme_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--format", "hf"]))
