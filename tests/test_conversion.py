"""HF <-> params <-> HF / orbax round trips, export loadable by transformers, bad input refused."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from replaceme_jax.conversion import export_hf, load_model, save_orbax
from replaceme_jax.cli import main
from replaceme_jax.errors import CheckpointError, UnsupportedModelError
from replaceme_jax.models import llama
from tests.helpers import assert_same_safetensors, make_model, random_batch, read_safetensors, torch_logits


@pytest.mark.parametrize("model_type,dtype,overrides", [
    ("llama", "float32", dict(tie_word_embeddings=True)),
    ("qwen2", "bfloat16", dict(tie_word_embeddings=False)),
    ("qwen3", "float16", dict()),
])
def test_hf_round_trip_is_bit_exact(tmp_path, model_type, dtype, overrides):
    make_model(tmp_path / "src", model_type, dtype=dtype, **overrides)
    model = load_model(tmp_path / "src")
    assert model.dtype == dtype
    export_hf(model, tmp_path / "out")
    assert_same_safetensors(tmp_path / "src", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == dtype
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_sharded_export_loads_in_transformers_with_same_logits(tmp_path):
    reference = make_model(tmp_path / "src", "llama", tie_word_embeddings=False)
    model = load_model(tmp_path / "src")
    export_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                          output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids, mask = random_batch(model.config.vocab_size, [8, 5], seed=0)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(reference, ids, mask))
    # and the sharded directory loads back into JAX identically
    again = load_model(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_with_dtype_cast(tmp_path):
    make_model(tmp_path / "src", "llama")
    export_hf(load_model(tmp_path / "src"), tmp_path / "out", dtype="bfloat16")
    tensors = read_safetensors(tmp_path / "out")
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert model.dtype == torch.bfloat16 and not info["missing_keys"]


def test_orbax_round_trip_is_bit_exact(tmp_path):
    make_model(tmp_path / "src", "qwen3", dtype="bfloat16")
    model = load_model(tmp_path / "src")
    save_orbax(model, tmp_path / "ckpt")
    restored = load_model(tmp_path / "ckpt")
    assert restored.source_format == "orbax" and restored.config == model.config
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(restored.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    export_hf(restored, tmp_path / "out")
    before, after = read_safetensors(tmp_path / "src"), read_safetensors(tmp_path / "out")
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_pytorch_bin_checkpoint_loads(tmp_path):
    import shutil

    reference = make_model(tmp_path / "src", "llama", tokenizer=False)
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "src" / "config.json", tmp_path / "bin" / "config.json")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    a, b = load_model(tmp_path / "src"), load_model(tmp_path / "bin")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exported_logits_equal_jax_logits(tmp_path):
    make_model(tmp_path / "src", "mistral", sliding_window=4)
    model = load_model(tmp_path / "src")
    export_hf(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask = random_batch(model.config.vocab_size, [9, 9], seed=5)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(llama.forward(model.params, model.config, ids, mask).logits)
    np.testing.assert_allclose(ours, torch_logits(reloaded, ids, mask), atol=1e-4)


# --- bad input -------------------------------------------------------------------------------------


def run_cli(*args):
    return main([*map(str, args), "-q"])


def test_missing_path_is_one_line_error(tmp_path, capsys):
    assert run_cli("convert", tmp_path / "nope", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file or directory" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_is_refused_without_partial_output(tmp_path, capsys):
    make_model(tmp_path / "src", "llama")
    weights = tmp_path / "src" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert run_cli("convert", tmp_path / "src", tmp_path / "out") == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_shard_is_named(tmp_path):
    make_model(tmp_path / "src", "llama")
    export_hf(load_model(tmp_path / "src"), tmp_path / "sharded", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path / "sharded")


def test_unexpected_and_missing_tensors_are_refused(tmp_path):
    from safetensors.numpy import save_file

    make_model(tmp_path / "src", "llama", tokenizer=False)
    tensors = read_safetensors(tmp_path / "src")
    extra = dict(tensors, **{"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    save_file(extra, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        load_model(tmp_path / "src")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        load_model(tmp_path / "src")


def test_shape_mismatch_is_refused(tmp_path):
    make_model(tmp_path / "src", "llama", tokenizer=False)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "src")


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"some_new_field": 3}, "unsupported config field"),
])
def test_unsupported_config_is_refused(tmp_path, capsys, change, message):
    make_model(tmp_path / "src", "llama", tokenizer=False)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.update(change)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(tmp_path / "src")
    assert run_cli("convert", tmp_path / "src", tmp_path / "out") == 1
    assert message.split("'")[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    make_model(tmp_path / "src", "llama", tokenizer=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert run_cli("convert", tmp_path / "src", tmp_path / "out") == 2  # a usage error, as in every command
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    assert run_cli("convert", tmp_path / "src", tmp_path / "out", "--overwrite") == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()


def test_usage_error_exits_2(capsys):
    assert main(["convert"]) == 2
    assert "error" in capsys.readouterr().err


def test_nan_weights_are_refused(tmp_path, capsys):
    from safetensors.numpy import save_file

    make_model(tmp_path / "src", "llama", tokenizer=False)
    tensors = read_safetensors(tmp_path / "src")
    tensors["model.layers.2.self_attn.v_proj.weight"][0, 0] = np.nan
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    assert run_cli("convert", tmp_path / "src", tmp_path / "out") == 1
    assert "layers.2.self_attn.v_proj.kernel contains NaN" in capsys.readouterr().err


def test_source_checkpoint_is_not_modified(tmp_path):
    make_model(tmp_path / "src", "llama")
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    assert run_cli("convert", tmp_path / "src", tmp_path / "out") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before
