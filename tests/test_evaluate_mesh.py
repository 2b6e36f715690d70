"""`evaluate --mesh`: the models sharded over 8 simulated CPU devices, the batches split over data x fsdp,
give the single device's figures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import WORDS, devices_env, make_model

ROOT = Path(__file__).resolve().parents[1]

# Each CLI call of the list runs in one process with `devices` simulated CPU devices (XLA reads the
# flag once, when the backend starts).
SCRIPT = """
import json, sys
from replaceme_jax.cli import main
for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
"""


def run_cli(calls: list[list[str]], devices: int) -> None:
    env = devices_env(devices)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(calls)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def words(rng, n):
    return " ".join(rng.choice(WORDS[4:], n))


def test_evaluate_on_a_mesh_of_8_devices_gives_the_single_device_figures(tmp_path):
    # 4 query heads, 2 KV heads, hidden 32, vocabulary 128: every axis the rules name divides by 2
    make_model(tmp_path / "model", "llama", num_attention_heads=4, num_key_value_heads=2)
    make_model(tmp_path / "reference", "llama", seed=1, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    text = tmp_path / "notes.txt"
    text.write_text(words(rng, 200))
    mc = tmp_path / "quiz.jsonl"
    mc.write_text("".join(json.dumps(row) + "\n" for row in [
        *({"query": words(rng, 5), "choices": [words(rng, n) for n in (1, 3, 2)], "gold": g} for g in (0, 1, 2, 1)),
        *({"context_options": [words(rng, 4), words(rng, 4)], "continuation": words(rng, 2), "gold": g}
          for g in (0, 1))]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{words(rng, 6)}\n{words(rng, 3)}\n")
    tasks = f"ppl:{text},mc:{mc}"

    def argv(out: str, *mesh: str) -> list[str]:
        # --batch-size 3: on data x fsdp = 4 ways the row count is rounded up (an empty row)
        return ["evaluate", "--model", str(tmp_path / "model"), "--reference", str(tmp_path / "reference"),
                "--tasks", tasks, "--max-length", "32", "--batch-size", "3", "--generate", str(prompts),
                "--max-new-tokens", "5", "--output", str(tmp_path / out), "-q", *mesh]

    run_cli([argv("single.json")], devices=1)
    # one mesh that uses every axis (a data-only mesh is the same code path with fsdp = tensor = 1)
    meshes = {"mixed.json": "data=2,fsdp=2,tensor=2"}
    run_cli([argv(out, "--mesh", mesh) for out, mesh in meshes.items()], devices=8)

    single = json.loads((tmp_path / "single.json").read_text())
    assert single["settings"]["mesh"] is None
    for out, mesh in meshes.items():
        sharded = json.loads((tmp_path / out).read_text())
        assert sharded["settings"]["mesh"] == {**{"data": 1, "fsdp": 1, "tensor": 1},
                                               **{k: int(v) for k, v in (p.split("=") for p in mesh.split(","))}}
        one, many = next(iter(single["models"].values())), next(iter(sharded["models"].values()))
        assert list(many["results"]) == list(one["results"]) == tasks.split(",")
        for task, figures in one["results"].items():
            for metric, value in figures.items():
                # float32 sums reduced in another order across devices (and a different vocabulary chunk
                # when the row count is rounded up): ~1e-7 relative per sum; accuracies and counts exact
                assert many["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (out, task, metric)
        assert one["results"][f"mc:{mc}"]["n"] == 6
        assert sharded["generation"]["items"] == single["generation"]["items"]
