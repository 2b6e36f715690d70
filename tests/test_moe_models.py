"""The JAX mixture-of-experts decoders equal `transformers` on tiny random models, and their
checkpoints convert both ways (per-expert and fused layouts) bit-exactly."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from replaceme_jax.conversion import export_hf, load_model
from replaceme_jax.errors import CheckpointError, UnsupportedModelError
from replaceme_jax.models import moe
from tests.helpers import assert_same_safetensors, random_batch, read_safetensors, torch_logits
from tests.moe_helpers import MOE_CONFIGS, make_moe_model, moe_hf_config

# float32 on both sides; the frameworks sum in different orders (experts in slot vs index order,
# matmul blocking), so logits of magnitude ~5 differ by a few ulps per op over 2 layers: ~5e-6
# observed, 1e-4 leaves margin for other BLAS builds while still catching any routing difference
# (one token sent to a wrong expert moves its logits by ~1e-1).
ATOL = 1e-4


def jax_logits(model, ids, mask, dispatch="auto"):
    with jax.default_matmul_precision("highest"):
        return np.asarray(moe.forward(model.params, model.config, ids, mask, dispatch=dispatch).logits)


@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_logits_match_transformers_with_right_padding(tmp_path, name):
    model_type, overrides = MOE_CONFIGS[name]
    reference = make_moe_model(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    assert isinstance(model.config, moe.MoeConfig)
    ids, mask = random_batch(model.config.vocab_size, [12, 7, 1, 12], seed=1)
    theirs = torch_logits(reference, ids, mask)
    valid = mask.astype(bool)
    for dispatch in ("dense", "ragged"):
        ours = jax_logits(model, ids, mask, dispatch)
        np.testing.assert_allclose(ours[valid], theirs[valid], atol=ATOL, rtol=0, err_msg=dispatch)


def test_logits_match_transformers_with_left_padding(tmp_path):
    model_type, overrides = MOE_CONFIGS["qwen2_moe_shared"]
    reference = make_moe_model(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    ids, mask = random_batch(model.config.vocab_size, [9, 4, 9], seed=2, left=True)
    valid = mask.astype(bool)  # pad queries attend to nothing; their logits are meaningless on both sides
    np.testing.assert_allclose(jax_logits(model, ids, mask)[valid], torch_logits(reference, ids, mask)[valid],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_shared"])
def test_layer_aux_is_the_routing_and_the_routed_expert_outputs(tmp_path, name):
    model_type, overrides = MOE_CONFIGS[name]
    reference = make_moe_model(tmp_path, model_type, **overrides)
    model = load_model(tmp_path)
    c, params = model.config, model.params
    ids, mask = random_batch(c.vocab_size, [10, 6], seed=3)
    with torch.no_grad():
        hf_router = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                              output_router_logits=True).router_logits
    with jax.default_matmul_precision("highest"):
        ctx = moe.attention_context(c, ids.shape, mask)
        h = params["embed_tokens"]["embedding"][ids]
        for index, layer in enumerate(params["layers"]):
            h_next, y, m, aux = moe.decoder_layer_with_aux(layer, c, index, h, ctx)
            np.testing.assert_allclose(np.asarray(aux.router_logits), hf_router[index].numpy(), atol=ATOL)
            x = np.asarray(aux.x, np.float64)
            experts = layer["mlp"]["experts"]
            wg, wu, wd = (np.asarray(experts[k]["kernel"], np.float64) for k in ("gate_proj", "up_proj", "down_proj"))
            slots = np.asarray(aux.experts)
            assert slots.shape == (x.shape[0], c.num_experts_per_tok)
            for t in range(0, x.shape[0], 3):
                for slot, e in enumerate(slots[t]):
                    g = x[t] @ wg[e]
                    brute = (g / (1 + np.exp(-g)) * (x[t] @ wu[e])) @ wd[e]
                    np.testing.assert_allclose(np.asarray(aux.outputs)[t, slot], brute, atol=1e-5)
            # the MoE branch is the gated sum of the routed outputs (plus the gated shared expert)
            branch = np.einsum("tk,tkd->td", np.asarray(aux.gates), np.asarray(aux.outputs))
            if "shared_expert" in layer["mlp"]:
                shared = {k: np.asarray(v["kernel"], np.float64) for k, v in layer["mlp"]["shared_expert"].items()}
                g = x @ shared["gate_proj"]
                out = (g / (1 + np.exp(-g)) * (x @ shared["up_proj"])) @ shared["down_proj"]
                gate = 1 / (1 + np.exp(-(x @ np.asarray(layer["mlp"]["shared_expert_gate"]["kernel"], np.float64))))
                branch = branch + gate * out
            np.testing.assert_allclose(np.asarray(m).reshape(branch.shape), branch, atol=1e-5)
            np.testing.assert_allclose(np.asarray(h_next), np.asarray(y + m), atol=0)
            h = h_next


@pytest.mark.parametrize("name,dtype", [("mixtral", "float32"), ("qwen2_moe_shared", "bfloat16"),
                                        ("qwen3_moe", "float16"), ("olmoe_clip_bias", "float32")])
def test_hf_round_trip_is_bit_exact(tmp_path, name, dtype):
    model_type, overrides = MOE_CONFIGS[name]
    make_moe_model(tmp_path / "src", model_type, dtype=dtype, tokenizer=True, **overrides)
    model = load_model(tmp_path / "src")
    assert model.dtype == dtype
    export_hf(model, tmp_path / "out")
    assert_same_safetensors(tmp_path / "src", tmp_path / "out")
    source_config = json.loads((tmp_path / "src" / "config.json").read_text())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in source_config.items()
                                                                 if k != "dtype"}


@pytest.mark.parametrize("name", ["mixtral_sliding_tied", "qwen2_moe_norm_topk", "olmoe"])
def test_sharded_export_loads_in_transformers_with_same_logits(tmp_path, name):
    model_type, overrides = MOE_CONFIGS[name]
    reference = make_moe_model(tmp_path / "src", model_type, **overrides)
    model = load_model(tmp_path / "src")
    export_hf(model, tmp_path / "out", max_shard_bytes=6_000)  # splits a layer's experts over shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                          output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = random_batch(model.config.vocab_size, [8, 5], seed=0)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(reference, ids, mask))
    again = load_model(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_shared"])
def test_fused_expert_layout_loads_like_per_expert(tmp_path, name):
    """transformers 5 holds experts fused (``experts.gate_up_proj`` [E, 2I, D]); a checkpoint saved in
    that layout must load to the same params, and transformers loads it too."""
    model_type, overrides = MOE_CONFIGS[name]
    reference = make_moe_model(tmp_path / "per_expert", model_type, **overrides)
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})
    (fused_dir / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())

    per_expert, fused = load_model(tmp_path / "per_expert"), load_model(fused_dir)
    for a, b in zip(jax.tree.leaves(per_expert.params), jax.tree.leaves(fused.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reloaded, info = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = random_batch(fused.config.vocab_size, [6, 3], seed=0)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(reference, ids, mask))


def test_missing_expert_tensor_is_named(tmp_path):
    model_type, overrides = MOE_CONFIGS["qwen3_moe"]
    make_moe_model(tmp_path / "src", model_type, **overrides)
    tensors = read_safetensors(tmp_path / "src")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    from safetensors.numpy import save_file as save_numpy

    save_numpy(tensors, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.up_proj\.kernel \(slices 5\)"):
        load_model(tmp_path / "src")


def test_duplicate_expert_tensor_is_refused(tmp_path):
    model_type, overrides = MOE_CONFIGS["mixtral"]
    reference = make_moe_model(tmp_path / "src", model_type, **overrides)
    fused = reference.state_dict()["model.layers.0.mlp.experts.down_proj"].contiguous().numpy()
    path = tmp_path / "src" / "model.safetensors"
    with safe_open(str(path), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # the per-expert tensors and the fused one side by side in the one weight file
    save_numpy({**tensors, "model.layers.0.mlp.experts.down_proj": fused}, str(path))
    with pytest.raises(CheckpointError, match="appears twice"):
        load_model(tmp_path / "src")


def _config(name, **changes) -> dict:
    """The config.json dict of a tiny test family, with changes."""
    model_type, overrides = MOE_CONFIGS[name]
    cfg = json.loads(moe_hf_config(model_type, **overrides).to_json_string())
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("name,changes,message", [
    ("qwen2_moe_shared", dict(decoder_sparse_step=2), "decoder_sparse_step"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4), "sliding-window"),
    ("olmoe", dict(num_experts=1), "fewer than num_experts_per_tok"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
    ("mixtral", dict(num_local_experts=None), "no num_experts"),
    ("qwen3_moe", dict(num_experts=4, num_local_experts=8), "disagree"),
    ("olmoe", dict(some_new_field=1), "some_new_field"),
])
def test_unsupported_configs_are_refused(name, changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        moe.config_from_hf(_config(name, **changes))


def test_both_spellings_of_the_expert_count_are_read_and_written_back():
    cfg = _config("qwen3_moe")
    cfg.pop("num_local_experts", None)
    cfg["num_experts"] = 8  # transformers 4.x spelling
    config = moe.config_from_hf(cfg)
    assert config.num_experts == 8 and config.expert_count_keys == ("num_experts",)
    assert moe.config_to_hf_updates(config.with_experts(6)) == {"num_hidden_layers": 2, "num_experts": 6}


def test_orbax_round_trip_is_bit_exact(tmp_path):
    from replaceme_jax.conversion import save_orbax

    model_type, overrides = MOE_CONFIGS["olmoe"]
    make_moe_model(tmp_path / "src", model_type, dtype="bfloat16", **overrides)
    model = load_model(tmp_path / "src")
    save_orbax(model, tmp_path / "ckpt")
    restored = load_model(tmp_path / "ckpt")
    assert restored.source_format == "orbax" and restored.config == model.config
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(restored.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
