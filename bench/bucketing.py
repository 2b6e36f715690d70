"""How many shapes (= compilations of the jitted capture step) a calibration run needs.

    python bench/bucketing.py [--size 1000] [--max-length 512] [--batch-size 8]
"""

import argparse
from pathlib import Path

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.data import load_calibration, make_batches, pad_token_id

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4_sample.jsonl"

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=1000)
parser.add_argument("--max-length", type=int, default=512)
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()
tokenizer = load_tokenizer(load_model("smollm2-135m"))
sequences = load_calibration(str(DATA), tokenizer, args.max_length, size=args.size, column="text")
for bucket, ordered in (("pow2", True), ("pow2", False), ("longest", False)):
    batches = make_batches(sequences, args.batch_size, args.max_length, pad_token_id(tokenizer), bucket=bucket,
                           sort_by_length=ordered)
    print(f"bucket={bucket:8s} sort_by_length={ordered!s:5s}: {len(batches)} batches, {len(batches.shapes)} shapes, "
          f"padding {100 * batches.padding_fraction:.1f}%")
