"""GGUF input: a file written with gguf.GGUFWriter loads to the weights transformers gives."""

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conversion import export_hf, load_model
from conversion.assets import smollm2_gguf
from conversion.gguf_io import apply_qk_permutation, undo_qk_permutation
from replaceme_jax.models import llama
from tests.helpers import make_model, random_batch, torch_logits


def write_llama_gguf(path, model, config):
    """What llama.cpp's converter writes for a llama model (F32 tensors, permuted Q/K rows)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
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
