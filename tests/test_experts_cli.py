"""`replaceme-jax experts`: YAML config -> compressed HF directory + report + recipe, end to end."""

import json

import jax
import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from replaceme_jax.conversion import load_model
from replaceme_jax.cli import main
from replaceme_jax.models import moe
from tests.helpers import WORDS, random_batch, torch_logits
from tests.moe_helpers import MOE_CONFIGS, make_moe_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    model_type, overrides = MOE_CONFIGS["qwen2_moe_shared"]
    make_moe_model(root / "model", model_type, tokenizer=True, **overrides)
    rng = np.random.default_rng(0)
    with open(root / "calib.jsonl", "w") as f:
        for _ in range(24):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 30)))}) + "\n")
    return root


def run_experts(root, name, **keys):
    config = dict(model_path=str(root / "model"), dataset=str(root / "calib.jsonl"), dataset_size=24, batch_size=8,
                  max_length=32, save_path=str(root / name))
    config.update(keys)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return main(["experts", "--config", str(root / f"{name}.yaml"), "-q"])


def loads_in_transformers(directory):
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model


def test_reap_writes_the_pruned_model_report_and_recipe(workspace):
    assert run_experts(workspace, "reap", method="reap", compression_ratio=0.5) == 0
    out = workspace / "reap"
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 3
    recipe = json.loads((out / "experts_recipe.json").read_text())
    report = json.loads((out / "experts_report.json").read_text())
    assert report["num_experts_before"] == 6 and report["num_experts_after"] == 3 and not report["sequential"]
    assert all(layer["reconstruction_error"] > 0 for layer in report["layers"])
    assert len(recipe["layers"]) == 2
    assert (out / "experts_saliency.png").stat().st_size > 0
    for layer in recipe["layers"]:
        reap = np.array(layer["saliency"]["reap"])
        assert layer["kept"] == sorted(np.argsort(-reap, kind="stable")[:3].tolist())

    # the exported model is the original with the removed experts' router logits at -inf
    original = load_model(workspace / "model")
    ids, mask = random_batch(original.config.vocab_size, [9, 4], seed=0)
    masks = [np.isin(np.arange(6), layer["kept"]) for layer in recipe["layers"]]
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(moe.forward(original.params, original.config, ids, mask, expert_masks=masks).logits)
    valid = mask.astype(bool)
    # float32, transformers vs JAX: see tests/test_moe_models.py
    np.testing.assert_allclose(torch_logits(loads_in_transformers(out), ids, mask)[valid], expected[valid], atol=1e-4)


def test_ream_merges_every_expert_into_a_group(workspace):
    assert run_experts(workspace, "ream", method="ream", num_experts=4, group_size=2, sample_tokens=64) == 0
    out = workspace / "ream"
    recipe = json.loads((out / "experts_recipe.json").read_text())
    report = json.loads((out / "experts_report.json").read_text())
    assert report["sequential"] and report["sample_tokens"] == 64 and report["num_experts_after"] == 4
    for layer in recipe["layers"]:
        members = sorted(m for g in layer["groups"] for m in g) + layer["dropped"]
        assert sorted(members) == list(range(6)) and len(layer["groups"]) == 4
        assert all(len(g) <= 2 for g in layer["groups"]) and not layer["dropped"]
        np.testing.assert_allclose([sum(w) for w in layer["weights"]], 1.0)
    model = loads_in_transformers(out)
    ids, mask = random_batch(model.config.vocab_size, [7, 3], seed=1)
    assert np.isfinite(torch_logits(model, ids, mask)).all()


@pytest.mark.parametrize("keys,message", [
    (dict(method="reap", num_experts=2), "cannot keep 2 experts per layer: fewer than num_experts_per_tok=3"),
    (dict(method="reap"), "exactly one of config keys 'num_experts' and 'compression_ratio'"),
    (dict(method="prune", num_experts=4), "config key 'method' must be one of"),
    (dict(method="reap", num_experts=4, group_sise=2), "unknown config key 'group_sise'"),
    (dict(method="reap", num_experts=4, dataset=[{"dataset": "x.jsonl", "ratio": -1}]),
     "config key 'dataset[0]': 'ratio' must be a positive number"),
])
def test_bad_configs_fail_with_one_line(workspace, capsys, keys, message):
    assert run_experts(workspace, "bad", **keys) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_recipe_prunes_at_another_ratio_without_calibration(workspace):
    assert run_experts(workspace, "reap4", method="reap", num_experts=4) == 0
    reap = workspace / "reap"
    if not (reap / "experts_recipe.json").exists():
        assert run_experts(workspace, "reap", method="reap", compression_ratio=0.5) == 0
    config = dict(model_path=str(workspace / "model"), method="reap", num_experts=4,
                  recipe_path=str(reap / "experts_recipe.json"), save_path=str(workspace / "from_recipe"))
    (workspace / "from_recipe.yaml").write_text(yaml.safe_dump(config))
    assert main(["experts", "--config", str(workspace / "from_recipe.yaml"), "-q"]) == 0
    calibrated = json.loads((workspace / "reap4" / "experts_recipe.json").read_text())
    reused = json.loads((workspace / "from_recipe" / "experts_recipe.json").read_text())
    assert [layer["kept"] for layer in reused["layers"]] == [layer["kept"] for layer in calibrated["layers"]]
    report = json.loads((workspace / "from_recipe" / "experts_report.json").read_text())
    assert report["calibration_tokens"] == 0 and report["num_experts_after"] == 4


def test_a_calibration_mixture_with_self_samples_is_recorded_in_the_report(workspace):
    mixture = [{"dataset": str(workspace / "calib.jsonl"), "ratio": 3}, {"dataset": "self", "ratio": 1}]
    assert run_experts(workspace, "mixed", method="reap", num_experts=4, dataset=mixture, dataset_size=8) == 0
    report = json.loads((workspace / "mixed" / "experts_report.json").read_text())
    assert report["config"]["dataset"] == mixture
    sources = report["calibration_sources"]
    assert [(s["dataset"], s["sequences"]) for s in sources] == [(mixture[0]["dataset"], 6), ("self", 2)]
    assert sum(s["tokens"] for s in sources) == report["calibration_tokens"]
    loads_in_transformers(workspace / "mixed")
