"""Run ``bench/replaceme_smollm2.py`` on a lent GPU machine whose image is not the project's environment.

That machine reaches no registry, and its image differs from ``pyproject.toml``'s pins: ``transformers``
5.17 (we pin >= 5.24 for the GGUF tokenizer builder) and no ``datasets``. So that the benchmark itself runs
unchanged there, this wrapper:

- checks the tokenizer built from the GGUF against token ids saved here (``--tokenizer-check``, written
  by ``--save-tokenizer`` on a machine with the pinned ``transformers``); when the GGUF builder fails or
  disagrees, it uses the saved ``tokenizer.json`` instead, and checks that too (exit 3 if neither agrees);
- when ``datasets`` cannot be imported, reads local ``.jsonl`` calibration files with ``json`` (the only
  kind the benchmark's GPU variants use; anything else raises).

Every other argument goes to ``bench/replaceme_smollm2.py``:

    python bench/device_run.py --save-tokenizer .dev/tokenizer          # here, once
    python bench/device_run.py --tokenizer-dir .dev/tokenizer -- --variants a,b --output $OUT/r.json

How the 2026-12-04 run was set up (BENCHMARKS.md, "First run on a lent GPU"). One call carries at most 64 MiB
and the GGUF is 98 MB, so the model went in two parts, the second call made within the 30 s the machine stays
warm, through /tmp there (kept while the machine is):
- here: ``.dev/`` and ``.dev2/`` in ``.git/info/exclude``; ``.dev/model.part_a`` = the GGUF's first 50,000,000
  bytes, ``.dev2/model.part_b`` the rest; ``.dev/data/`` = ../shared/data's c4_sample.jsonl under calibration/,
  wikitext2_test.raw and the first 600 rows of each multiple-choice/LAMBADA file under eval/; ``.dev/whl/`` =
  the datasets, dill, multiprocess and gguf wheels for Python 3.12 (the device README's pip download line);
  ``.dev/tokenizer`` from ``--save-tokenizer``;
- call 1 (carry .dev): copy all of it to /tmp/keep, ``pip install --no-index --no-deps --target
  /tmp/keep/site /tmp/keep/whl/*.whl``;
- call 2 (carry .dev2): ``cat`` both parts to /tmp/keep/cache/SmolLM2-135M-Instruct.Q4_1.gguf, then with
  ``PYTHONPATH=/tmp/keep/site:. REPLACEME_JAX_CACHE=/tmp/keep/cache REPLACEME_BENCH_DATA=/tmp/keep/data
  JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest`` run this file as above.
At SmolLM2's size every stage is XLA compilation, one per batch shape and program (about 25 s each there), so
GPU variants should set ``bucket: 512`` (one padded length; unmeasured there) and use a persistent
``JAX_COMPILATION_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
CHECK_TEXTS = ["The capital of France is", " Hello  world\n\nNew paragraph: naïve café 123,456."]

log = logging.getLogger("device_run")


def _ids(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


def save_tokenizer(directory: Path) -> None:
    from replaceme_jax.conversion import assets, gguf_metadata

    tokenizer = gguf_metadata.gguf_tokenizer(assets.smollm2_gguf())  # what load_tokenizer builds, without the weights
    tokenizer.save_pretrained(str(directory))
    wikitext = (ROOT.parent / "shared" / "data" / "eval" / "wikitext2_test.raw").read_text()[:3000]
    texts = [*CHECK_TEXTS, wikitext]
    (directory / "check.json").write_text(json.dumps({"texts": texts, "ids": _ids(tokenizer, texts),
                                                      "pad": tokenizer.pad_token_id}))


def _agrees(tokenizer, check: dict) -> bool:
    return _ids(tokenizer, check["texts"]) == check["ids"] and tokenizer.pad_token_id == check["pad"]


def use_checked_tokenizer(directory: Path) -> str:
    from transformers import AutoTokenizer

    from replaceme_jax.conversion import assets, gguf_metadata

    check = json.loads((directory / "check.json").read_text())
    try:
        if _agrees(gguf_metadata.gguf_tokenizer(assets.smollm2_gguf(download=False)), check):
            return "built from the GGUF"
    except Exception as e:  # the image's transformers may lack what the builder uses
        log.warning("GGUF tokenizer builder failed here: %s", e)
    saved = AutoTokenizer.from_pretrained(str(directory))
    if not _agrees(saved, check):
        raise SystemExit(3)
    gguf_metadata.gguf_tokenizer = lambda path: saved
    return "the saved tokenizer.json"


class _JsonRows:
    """The part of a ``datasets.Dataset`` that ``replaceme_jax.data.sources`` reads."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: slice):
        return {name: [row[name] for row in self.rows[index]] for name in self.column_names}


def use_json_reader_if_no_datasets() -> str:
    try:
        import datasets  # noqa: F401

        return "datasets"
    except Exception as e:
        log.warning("datasets does not import here (%s): reading .jsonl with json", e)
    from replaceme_jax.data import sources

    def open_local(path, subset, split):
        if Path(path).suffix != ".jsonl":
            raise RuntimeError(f"{path}: only .jsonl without datasets")
        return _JsonRows([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()])

    sources._open_local = open_local
    return "json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-tokenizer", type=Path)
    parser.add_argument("--tokenizer-dir", type=Path)
    args, rest = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer)
        return
    import jax

    print(f"jax {jax.__version__} on {jax.devices()}; matmul precision {jax.config.jax_default_matmul_precision}",
          flush=True)
    print("tokenizer:", use_checked_tokenizer(args.tokenizer_dir), "; data:", use_json_reader_if_no_datasets(),
          flush=True)
    import replaceme_smollm2

    sys.argv = [sys.argv[0], *[a for a in rest if a != "--"]]
    replaceme_smollm2.main()


if __name__ == "__main__":
    main()
