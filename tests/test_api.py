"""The Python API and the Flax NNX module: what a JAX researcher imports."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

import replaceme_jax as rj
from replaceme_jax.conversion import load_model
from replaceme_jax.errors import UsageError
from tests.helpers import WORDS, make_model, random_batch, torch_logits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    make_model(root / "m", "llama", num_hidden_layers=6, tie_word_embeddings=False)
    return root / "m"


def texts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 30)))) for _ in range(n)]


def test_from_pretrained_is_an_nnx_module_with_hf_layout_state_and_torch_logits(model_dir):
    model = rj.from_pretrained(model_dir)
    assert isinstance(model, nnx.Module) and isinstance(model, rj.CausalLM)
    state = nnx.state(model, nnx.Param)
    assert set(state.keys()) == {"embed_tokens", "layers", "norm", "lm_head"}
    assert len(state["layers"]) == 6
    assert state["layers"][0]["mlp"]["down_proj"]["kernel"].get_value().shape == (64, 32)
    assert state["layers"][0]["mlp"]["down_proj"]["kernel"].get_metadata()["out_sharding"] == ("mlp", "embed")
    ids, mask = random_batch(128, [12, 7], seed=1)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    reference = torch_logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], reference[valid], atol=1e-4)


def test_params_round_trip_and_split_merge(model_dir):
    model = rj.from_pretrained(model_dir)
    loaded = load_model(str(model_dir))
    ours = model.params()
    assert isinstance(ours["layers"], list)
    jax.tree.map(np.testing.assert_array_equal, ours, loaded.params)
    graph, state = nnx.split(model)
    again = nnx.merge(graph, state)
    ids = jnp.asarray([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_nnx_jit_and_an_in_place_update_change_the_output(model_dir):
    model = rj.from_pretrained(model_dir)
    ids = jnp.asarray([[5, 6, 7, 8]])
    before = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    model.norm["scale"].set_value(model.norm["scale"].get_value() * 0)
    after = np.asarray(model(ids))
    assert not np.allclose(before, after)


def test_save_pretrained_writes_what_transformers_loads(model_dir, tmp_path):
    model = rj.from_pretrained(model_dir)
    rj.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_partition_specs_follow_the_logical_axis_rules(model_dir):
    model = rj.from_pretrained(model_dir)
    specs = model.partition_specs()
    mlp = specs["layers"][0]["mlp"]
    assert tuple(mlp["gate_proj"]["kernel"].get_value()) == ("fsdp", "tensor")
    custom = model.partition_specs({"embed": None, "mlp": "model", "vocab": None, "q_heads": None,
                                    "kv_heads": None, "head_dim": None})
    assert tuple(custom["layers"][0]["mlp"]["down_proj"]["kernel"].get_value()) == ("model", None)


def test_shard_places_parameters_on_an_8_device_mesh(model_dir):
    script = f"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
import replaceme_jax as rj
model = rj.from_pretrained({str(model_dir)!r})
ids = jnp.asarray([[5, 6, 7, 8, 9]])
with jax.default_matmul_precision("highest"):
    before = np.asarray(model(ids))
mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
model.shard(mesh)
kernel = model.layers[0]["mlp"]["gate_proj"]["kernel"].get_value()
print(kernel.sharding.spec, len(kernel.addressable_shards))
with jax.default_matmul_precision("highest"):
    after = np.asarray(model(ids))
print(float(np.abs(after - before).max()))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    spec_line, diff = out.stdout.strip().splitlines()[-2:]
    assert spec_line == "P('fsdp', 'tensor') 8"
    assert float(diff) < 1e-4


def test_compress_on_texts_in_memory_writes_nothing_and_returns_a_module(model_dir, tmp_path):
    model = rj.from_pretrained(model_dir)
    result = rj.compress(model, texts(), layers_to_skip=2, max_length=48, batch_size=8)
    pruned = result.module()
    assert isinstance(pruned, rj.CausalLM) and pruned.config.num_hidden_layers == 4
    assert result.save_path is None and not list(tmp_path.iterdir())
    assert result.report["calibration_sources"][0]["dataset"] == "<sequences>"
    assert pruned(jnp.asarray([[5, 6, 7]])).shape == (1, 3, 128)


def test_compress_on_token_ids_equals_compress_on_the_same_texts(model_dir):
    from replaceme_jax.conversion import load_tokenizer
    from replaceme_jax.data import tokenize_texts

    loaded = load_model(str(model_dir))
    ids = tokenize_texts(load_tokenizer(loaded), texts(), 48)
    by_text = rj.compress(model_dir, texts(), layers_to_skip=2, max_length=48, batch_size=8)
    by_ids = rj.compress(loaded, [s.tolist() for s in ids], layers_to_skip=2, max_length=48, batch_size=8)
    assert by_text.report["blocks"] == by_ids.report["blocks"]
    a, b = by_text.blocks[0].T, by_ids.blocks[0].T
    assert (a is None) == (b is None)
    if a is not None:
        np.testing.assert_array_equal(a, b)


def test_distances_and_a_file_dataset(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    d = rj.distances(str(model_dir), str(data), layers_to_skip=2, max_length=48, dataset_size=40)
    assert sorted(d) == [1, 2, 3, 4] and all(0 <= v <= 1 for v in d.values())


def test_bad_options_are_usage_errors(model_dir):
    with pytest.raises(UsageError, match="did you mean 'layers_to_skip'"):
        rj.compress(model_dir, texts(), layer_to_skip=2)
    with pytest.raises(UsageError, match="empty"):
        rj.compress(model_dir, [], layers_to_skip=2)


def test_import_is_light():
    code = "import sys, replaceme_jax; print('jax' in sys.modules, 'flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_evaluate_is_the_api_function_and_scores_a_saved_model(model_dir, tmp_path):
    import replaceme_jax.evaluation  # noqa: F401  (importing the module must not shadow the function)

    assert callable(rj.evaluate) and rj.evaluate.__module__ == "replaceme_jax.api"
    text = tmp_path / "t.txt"
    text.write_text(" ".join(texts(20)))
    report = rj.evaluate([model_dir], [f"ppl:{text}"], max_length=32)
    (entry,) = report["models"].values()
    (result,) = entry["results"].values()
    assert np.isfinite(result["perplexity"]) and result["perplexity"] > 1


def test_compress_on_a_module_finds_a_planted_identity_block_and_keeps_the_logits(tmp_path):
    from tests.test_replaceme import zero_layers

    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    zero_layers(tmp_path / "m", [2, 3])
    model = rj.from_pretrained(tmp_path / "m")
    # the distance alone: on a random model another block's map can score as well on held-out text
    result = rj.compress(model, texts(), layers_to_skip=2, max_length=48, batch_size=8, block_choice="distance")
    assert result.report["blocks"] == [[2, 4]]
    ids, mask = random_batch(128, [12, 7], seed=4)
    with jax.default_matmul_precision("highest"):
        before = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
        after = np.asarray(result.module()(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(after[mask.astype(bool)], before[mask.astype(bool)], atol=1e-4)


def test_cli_compress_on_a_tiny_qwen2_moe_removes_a_planted_identity_block(tmp_path, capsys):
    from replaceme_jax.cli import main
    from tests.moe_helpers import MOE_CONFIGS, make_moe_model
    from tests.test_replaceme import write_corpus, zero_layers

    model_type, overrides = MOE_CONFIGS["qwen2_moe_shared"]
    make_moe_model(tmp_path / "m", model_type, tokenizer=True, **dict(overrides, num_hidden_layers=5))
    zero_layers(tmp_path / "m", [2, 3])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    write_corpus(tmp_path / "data.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"model_path: {tmp_path / 'm'}\ndataset: {tmp_path / 'data.jsonl'}\nlayers_to_skip: 2\n"
                      f"max_length: 48\nsave_path: {tmp_path / 'out'}\n")
    assert main(["compress", "--config", str(config), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "replaceme_report.json").read_text())
    assert report["blocks"] == [[2, 4]]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(pruned).__name__ == "Qwen2MoeForCausalLM" and pruned.config.num_hidden_layers == 3
    ids, mask = random_batch(reference.config.vocab_size, [14, 9], seed=5)
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(pruned, ids, mask)[valid], torch_logits(reference, ids, mask)[valid],
                               atol=1e-4)


def test_readme_python_api_example_runs(tmp_path):
    """The README's first "Python API" block, on a tiny model instead of SmolLM2 (8 CPU devices)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    make_model(tmp_path / "m", "llama", num_hidden_layers=12)
    (tmp_path / "wiki.txt").write_text(" ".join(texts(60, seed=2)))
    code = code.replace('"smollm2-135m"', repr(str(tmp_path / "m"))).replace('"out/"', repr(str(tmp_path / "out")))
    code = code.replace('"wikitext2,arc_easy"', repr(f"ppl:{tmp_path / 'wiki.txt'}"))
    prelude = f"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import numpy as np
from tests.test_api import texts as make_texts
texts = make_texts()
input_ids = np.asarray([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], np.int32)
attention_mask = (input_ids > 0).astype(np.int32)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").is_file()
