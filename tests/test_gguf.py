"""GGUF input: a file written with gguf.GGUFWriter loads to the weights transformers gives."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from replaceme_jax.conversion import export_hf, load_model
from replaceme_jax.conversion.assets import smollm2_gguf
from replaceme_jax.conversion.gguf_io import apply_qk_permutation, undo_qk_permutation
from replaceme_jax.models import llama
from tests.helpers import make_model, random_batch, torch_logits


def new_writer(path, arch, config):
    """A GGUFWriter with the attention/size metadata every architecture carries."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    return writer


def write_llama_gguf(path, model, config):
    """What llama.cpp's converter writes for a llama model (F32 tensors, permuted Q/K rows)."""
    writer = new_writer(path, "llama", config)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for key, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{per_layer[rest]}"
            if rest.startswith("self_attn.q_proj"):
                w = apply_qk_permutation(w, config.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                w = apply_qk_permutation(w, config.num_key_value_heads)
        else:
            name = names[key]
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qk_permutation_round_trip():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    np.testing.assert_array_equal(undo_qk_permutation(apply_qk_permutation(w, 4), 4), w)
    assert not np.array_equal(apply_qk_permutation(w, 4), w)


def test_gguf_loads_to_the_weights_transformers_gives(tmp_path):
    reference = make_model(tmp_path / "hf", "llama", tokenizer=False, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False)
    gguf_path = tmp_path / "model.gguf"
    write_llama_gguf(gguf_path, reference, reference.config)
    ours = load_model(gguf_path)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    from_hf = load_model(tmp_path / "hf")
    state = theirs.state_dict()
    np.testing.assert_array_equal(np.asarray(ours.params["layers"][1]["self_attn"]["q_proj"]["kernel"]),
                                  state["model.layers.1.self_attn.q_proj.weight"].numpy().T)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(from_hf.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = random_batch(ours.config.vocab_size, [7, 3], seed=0)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(llama.forward(ours.params, ours.config, ids, mask).logits)
    np.testing.assert_allclose(logits[mask.astype(bool)], torch_logits(theirs, ids, mask)[mask.astype(bool)],
                               atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf(download=False) is None, reason="SmolLM2 GGUF not in the cache")
def test_real_smollm2_gguf_matches_transformers(tmp_path):
    path = smollm2_gguf(download=False)
    model = load_model(path)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    export_hf(model, tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids, mask = random_batch(model.config.vocab_size, [32, 20], seed=0)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda p, i, m: llama.forward(p, model.config, i, m).logits)(model.params, ids, mask))
    theirs = torch_logits(reference, ids, mask)
    valid = mask.astype(bool)
    # 30 layers of float32 with logits up to ~30: 2e-4 absolute was observed at most (BLAS order).
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-3)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), theirs)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()


# llama.cpp's names for the MoE tensors; experts stacked [E, out, in] (gate and up apart).
_MOE_PER_LAYER = {
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_moe_gguf(path, model, config, arch):
    """What llama.cpp's converter writes for mixtral (arch "llama"), qwen2moe and qwen3moe: F32 tensors."""
    writer = new_writer(path, arch, config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "llama":
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_feed_forward_length(4 * config.hidden_size)  # the dense size the file would also carry
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    attention = {f"self_attn.{p}_proj.{kind}": f"attn_{g}.{kind}" for p, g in
                 (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for kind in ("weight", "bias")}
    for key, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if not key.startswith("model.layers."):
            writer.add_tensor(names[key], np.ascontiguousarray(w))
            continue
        i, rest = key[len("model.layers."):].split(".", 1)
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, D]: gate rows first
            gate, up = np.split(w, 2, axis=1)
            writer.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            writer.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(up))
            continue
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = config.num_attention_heads if ".q_proj" in rest else config.num_key_value_heads
            w = apply_qk_permutation(w, heads)
        writer.add_tensor(f"blk.{i}.{(_MOE_PER_LAYER | attention)[rest]}", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# (llama.cpp never renormalises Qwen2-MoE gates, so only norm_topk_prob false is a faithful qwen2moe file.)
@pytest.mark.parametrize("name,arch", [("mixtral", "llama"), ("qwen2_moe_shared", "qwen2moe"),
                                       ("qwen3_moe", "qwen3moe")])
def test_moe_gguf_loads_to_the_hf_weights_and_logits(tmp_path, name, arch):
    from replaceme_jax.models import moe
    from tests.moe_helpers import MOE_CONFIGS, make_moe_model

    model_type, overrides = MOE_CONFIGS[name]
    reference = make_moe_model(tmp_path / "hf", model_type, **overrides)
    write_moe_gguf(tmp_path / "model.gguf", reference, reference.config, arch)
    ours, from_hf = load_model(tmp_path / "model.gguf"), load_model(tmp_path / "hf")
    assert ours.config.model_type == model_type
    for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "shared_expert_intermediate_size", "qk_norm", "qkv_bias"):
        assert getattr(ours.config, field) == getattr(from_hf.config, field), field
    assert jax.tree.structure(ours.params) == jax.tree.structure(from_hf.params)
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(from_hf.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = random_batch(ours.config.vocab_size, [7, 3], seed=0)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(moe.forward(ours.params, ours.config, ids, mask).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], torch_logits(reference, ids, mask)[valid], atol=1e-4)
    # and it exports as the HF family transformers loads
    export_hf(dataclasses.replace(ours, tokenizer_source=None), tmp_path / "out")  # this file has no tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask)[valid], logits[valid], atol=1e-4)
