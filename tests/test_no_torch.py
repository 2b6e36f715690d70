"""The CLI runs with torch absent: `pip install -e .` has no torch (it is only the tests' reference).

The tiny models are built here with torch; the commands run in a subprocess where torch cannot be found.
The blocker wraps the path finder, so torch looks uninstalled: `import torch` raises
ModuleNotFoundError and transformers' `is_torch_available()` is False. It records every lookup of
`torch` or `torch.*`. Lookups through `importlib.util.find_spec` are availability probes (transformers
and datasets make them at import time) and are allowed, since they load nothing; any other lookup is
an import attempt on the run path and fails the test, even one a `try/except ImportError` would
survive.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import WORDS, make_model
from tests.moe_helpers import MOE_CONFIGS, make_moe_model
from tests.test_gguf import gguf_tokenizer_fields, write_llama_gguf

REPO = Path(__file__).resolve().parents[1]

# Runs before any other import of the subprocess; argv[1]: JSON list of CLI argument lists.
RUNNER = r'''
import importlib.machinery, json, sys

assert "torch" not in sys.modules, "torch was imported at interpreter start-up"
lookups = []
_find_spec = importlib.machinery.PathFinder.find_spec.__func__


def _without_torch(cls, name, path=None, target=None):
    if name != "torch" and not name.startswith("torch."):
        return _find_spec(cls, name, path, target)
    frame, probe, where = sys._getframe(1), False, []
    while frame is not None:
        probe |= frame.f_globals.get("__name__") == "importlib.util" and frame.f_code.co_name == "find_spec"
        if not frame.f_code.co_filename.startswith("<frozen"):
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
        frame = frame.f_back
    lookups.append({"module": name, "probe": probe, "where": where[:6]})
    return None  # not found, as when torch is not installed


importlib.machinery.PathFinder.find_spec = classmethod(_without_torch)
try:
    import torch
    blocked = False
except ModuleNotFoundError:
    blocked = True
blocker = {"import_torch_blocked": blocked, "lookup_recorded": [l["module"] for l in lookups] == ["torch"]}
lookups.clear()

from transformers.utils import is_torch_available

blocker["is_torch_available"] = is_torch_available()
from replaceme_jax.cli import main

startup = list(lookups)  # importing transformers and the CLI
results = []
for argv in json.loads(sys.argv[1]):
    start = len(lookups)
    code = main(argv)
    results.append({"argv": argv, "code": code, "lookups": lookups[start:]})
print("RESULTS " + json.dumps({"blocker": blocker, "startup": startup, "results": results}))
'''


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Build the tiny inputs with torch, then run every command once in the torch-less subprocess."""
    root = tmp_path_factory.mktemp("no_torch")
    rng = np.random.default_rng(0)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi)))  # noqa: E731
    calib = _write_jsonl(root / "calib.jsonl", [{"text": sentence(6, 40)} for _ in range(48)])
    text = root / "notes.txt"
    text.write_text(" ".join(sentence(8, 20) + "." for _ in range(20)))
    quiz = _write_jsonl(root / "quiz.jsonl", [{"query": sentence(3, 6), "choices": [sentence(1, 3), sentence(1, 3)],
                                               "gold": i % 2} for i in range(4)])

    make_model(root / "hf", "llama", num_hidden_layers=3)
    vocab = len(gguf_tokenizer_fields("smollm")["tokens"])  # every id the GGUF's tokenizer gives is in range
    reference = make_model(root / "gguf_source", "llama", tokenizer=False, vocab_size=vocab, num_hidden_layers=3,
                           tie_word_embeddings=False)
    (root / "gguf").mkdir()
    gguf = root / "gguf" / "model.gguf"
    write_llama_gguf(gguf, reference, reference.config, tokenizer="smollm")
    model_type, overrides = MOE_CONFIGS["qwen2_moe_shared"]
    make_moe_model(root / "moe", model_type, tokenizer=True, **overrides)

    data = dict(dataset=str(calib), dataset_size=48, batch_size=8, max_length=48)
    configs = {
        "compress_hf": dict(method="lstsq", model_path=str(root / "hf"), layers_to_skip=1,
                            save_path=str(root / "out_hf"), **data),
        "compress_gguf": dict(method="lstsq", model_path=str(gguf), layers_to_skip=1,
                              save_path=str(root / "out_gguf"), **data),
        "experts": dict(method="reap", model_path=str(root / "moe"), compression_ratio=0.5,
                        save_path=str(root / "out_moe"), **data),
    }
    for name, config in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    commands = {
        "convert": ["convert", str(gguf), str(root / "converted"), "-q"],
        "compress_hf": ["compress", "--config", str(root / "compress_hf.yaml"), "-q"],
        "compress_gguf": ["compress", "--config", str(root / "compress_gguf.yaml"), "-q"],
        "evaluate": ["evaluate", "--model", str(root / "hf"), "--model", str(gguf), "--tasks",
                     f"ppl:{text},mc:{quiz}", "--max-length", "32", "--batch-size", "4",
                     "--output", str(root / "eval" / "eval.json"), "-q"],
        "experts": ["experts", "--config", str(root / "experts.yaml"), "-q"],
    }
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(list(commands.values()))], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULTS "):])
    out["results"] = dict(zip(commands, out["results"]))
    out["root"], out["stderr"] = root, proc.stderr
    return out


def test_the_blocker_hides_torch(runs):
    assert runs["blocker"] == {"import_torch_blocked": True, "lookup_recorded": True, "is_torch_available": False}
    assert runs["startup"] and all(lookup["probe"] for lookup in runs["startup"]), runs["startup"]


@pytest.mark.parametrize("command", ["convert", "compress_hf", "compress_gguf", "evaluate", "experts"])
def test_command_runs_without_importing_torch(runs, command):
    result = runs["results"][command]
    assert result["code"] == 0, runs["stderr"][-4000:]
    attempts = [lookup for lookup in result["lookups"] if not lookup["probe"]]
    assert attempts == [], attempts
    root = runs["root"]
    expected = {"convert": ["converted/config.json", "converted/model.safetensors", "converted/tokenizer.json",
                            "converted/generation_config.json"],
                "compress_hf": ["out_hf/model.safetensors", "out_hf/replaceme_report.json"],
                "compress_gguf": ["out_gguf/model.safetensors", "out_gguf/tokenizer.json"],
                "evaluate": ["eval/eval.json"],
                "experts": ["out_moe/model.safetensors", "out_moe/experts_recipe.json"]}[command]
    for name in expected:
        assert (root / name).is_file(), name
