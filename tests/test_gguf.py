"""GGUF input: a file written with gguf.GGUFWriter loads to the weights, config and tokenizer transformers gives."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from replaceme_jax.conversion import export_hf, load_model
from replaceme_jax.conversion.assets import smollm2_gguf
from replaceme_jax.conversion.gguf_io import apply_qk_permutation, undo_qk_permutation
from replaceme_jax.conversion.gguf_metadata import gguf_hf_config, gguf_tokenizer, open_gguf
from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import llama
from tests.helpers import WORDS, hf_config, make_model, random_batch, torch_logits

_CORPUS = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 3)] + ["Hello, World! 42 times.\n"]


def _trained_bpe(byte_level: bool, size: int) -> tuple[list[str], list[str]]:
    """(tokens by id, merges) of a small BPE trained on WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if byte_level
                               else pre_tokenizers.Metaspace())
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    tokenizer.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet,
                                                               show_progress=False))
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return sorted(model["vocab"], key=model["vocab"].get), merges


@functools.cache
def gguf_tokenizer_fields(kind: str) -> dict:
    """tokenizer.* metadata as llama.cpp writes it. "smollm" and "qwen2": byte-level BPE (gpt2) with that
    pre-tokenizer name (qwen2 has a split regex in transformers, smollm none); "llama": sentencepiece BPE
    with byte fallback and merges implied by the scores, no pad token, no add_bos flag (as Mistral's)."""
    if kind in ("smollm", "qwen2"):
        pieces, merges = _trained_bpe(byte_level=True, size=300)
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        return dict(model="gpt2", pre=kind, tokens=specials + pieces, types=[3] * 3 + [1] * len(pieces),
                    merges=merges, bos=1, eos=2, unk=0, pad=2, add_bos=False, chat_template=template)
    pieces, _ = _trained_bpe(byte_level=False, size=80)
    specials, byte_tokens = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    return dict(model="llama", tokens=specials + byte_tokens + pieces,
                types=[2, 3, 3] + [6] * 256 + [1] * len(pieces),
                scores=[0.0] * 259 + [-float(i) for i in range(len(pieces))], bos=1, eos=2, unk=0,
                add_space_prefix=True)


# gguf_tokenizer_fields key -> the GGUFWriter method that writes it
_TOKENIZER_WRITERS = {
    "model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
    "types": "add_token_types", "scores": "add_token_scores", "merges": "add_token_merges",
    "bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id", "pad": "add_pad_token_id",
    "add_bos": "add_add_bos_token", "add_space_prefix": "add_add_space_prefix", "chat_template": "add_chat_template",
}


def add_tokenizer(writer, kind: str) -> None:
    for field, value in gguf_tokenizer_fields(kind).items():
        getattr(writer, _TOKENIZER_WRITERS[field])(value)


def new_writer(path, arch, config, tokenizer=None, name=None):
    """A GGUFWriter with the attention/size metadata every architecture carries (and a tokenizer if asked)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    return writer


def write_llama_gguf(path, model, config, tokenizer=None):
    """What llama.cpp's converter writes for a llama model (F32 tensors, permuted Q/K rows)."""
    writer = new_writer(path, "llama", config, tokenizer)
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


def write_moe_gguf(path, model, config, arch, tokenizer=None):
    """What llama.cpp's converter writes for mixtral (arch "llama"), qwen2moe and qwen3moe: F32 tensors."""
    writer = new_writer(path, arch, config, tokenizer)
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


def write_dense_gguf_metadata(path, arch, config, tokenizer, name=None):
    """The metadata llama.cpp writes for a dense llama/qwen2/qwen3 model, no tensors (so tied embeddings)."""
    writer = new_writer(path, arch, config, tokenizer, name)
    writer.add_feed_forward_length(config.intermediate_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    elif arch == "qwen3":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_family_gguf(root, case):
    """(GGUF path in a folder of its own, the HF config it was written from) for one test family."""
    from tests.moe_helpers import MOE_CONFIGS, make_moe_model

    path = root / "gguf" / "model.gguf"
    path.parent.mkdir()
    if case == "llama":  # SmolLM2's layout: llama with a byte-level BPE
        model = make_model(root / "hf", "llama", tokenizer=False, tie_word_embeddings=False)
        write_llama_gguf(path, model, model.config, tokenizer="smollm")
        return path, model.config
    if case in ("mixtral", "qwen2moe", "qwen3moe"):
        name, arch, tokenizer = {"mixtral": ("mixtral", "llama", "llama"),
                                 "qwen2moe": ("qwen2_moe_shared", "qwen2moe", "qwen2"),
                                 "qwen3moe": ("qwen3_moe", "qwen3moe", "qwen2")}[case]
        model_type, overrides = MOE_CONFIGS[name]
        model = make_moe_model(root / "hf", model_type, **overrides)
        write_moe_gguf(path, model, model.config, arch, tokenizer=tokenizer)
        return path, model.config
    model_type, arch, tokenizer, name, overrides = {
        "qwen2": ("qwen2", "qwen2", "qwen2", None, {}),
        "qwen3": ("qwen3", "qwen3", "qwen2", None, dict(head_dim=16)),
        # the only general.name transformers reads as Mistral (see gguf_metadata); any other stays Llama
        "mistral": ("mistral", "llama", "llama", "mistral", dict(head_dim=8)),
        "llama_named_mistral": ("llama", "llama", "llama", "Mistral 7B Instruct v0.3", {}),
    }[case]
    config = hf_config(model_type, tie_word_embeddings=True, **overrides)
    write_dense_gguf_metadata(path, arch, config, tokenizer, name)
    return path, config


# Keys transformers' GGUF config has and ours sets differently on purpose: architectures (it leaves None),
# _name_or_path and _model_name_or_path (where and under which name it read the file, not the model).
_PROVENANCE = {"architectures", "_name_or_path", "_model_name_or_path"}
# Where transformers takes its config class's default instead of the file's metadata (ours reads the file).
_FIXED_BY_US = {"qwen2moe": {"moe_intermediate_size", "shared_expert_intermediate_size"},
                "qwen3moe": {"moe_intermediate_size"}, "qwen3": {"head_dim"}}
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "num_experts",
               "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "norm_topk_prob")

TEXTS = [
    "the city by the river", "Hello, World! 42 times.", " leading space", "   three leading spaces",
    "trailing space ", "line one\nline two\n\nline four", "\ttab\tseparated", "ünïcödé café naïve", "漢字とかな",
    "emoji 🙂👍🏽", "<|im_start|>user\nhi<|im_end|>", "<s> literal specials </s>", "", "   ",
    "don't won't they're", "numbers 1234567 3.14159", "MiXeD CaSe WORDS", "a\r\nwindows line",
    "spaces    in    between", "the" * 10,
]


def assert_same_encoding(ours, theirs):
    for special in (True, False):
        ids = ours(TEXTS, add_special_tokens=special)["input_ids"]
        assert ids == theirs(TEXTS, add_special_tokens=special)["input_ids"]
        for row in ids:
            for skip in (False, True):
                assert ours.decode(row, skip_special_tokens=skip) == theirs.decode(row, skip_special_tokens=skip)


def assert_same_tokenizer(ours, theirs, tmp_path):
    assert type(ours) is type(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map and ours.all_special_ids == theirs.all_special_ids
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "add_bos_token", "add_eos_token",
                 "chat_template", "model_max_length", "padding_side"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert_same_encoding(ours, theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    for name in names:
        a, b = ((tmp_path / side / name).read_text() for side in ("ours", "theirs"))
        if name == "tokenizer_config.json":  # transformers also records how it was loaded (local or not)
            a, b = ({k: v for k, v in json.loads(x).items() if k not in ("is_local", "local_files_only")}
                    for x in (a, b))
        assert a == b, name
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert type(reloaded) is type(theirs)
    assert_same_encoding(reloaded, theirs)


@pytest.mark.parametrize("case", ["llama", "mixtral", "qwen2moe", "qwen3moe", "qwen2", "qwen3", "mistral",
                                  "llama_named_mistral"])
def test_config_and_tokenizer_match_transformers(tmp_path, case):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer

    from replaceme_jax.conversion.gguf_metadata import _tokenizer_parts, read_metadata

    path, source = write_family_gguf(tmp_path, case)
    ours = gguf_hf_config(path, open_gguf(path))
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    differ = {k for k in ours.keys() & theirs.keys() - _PROVENANCE if ours[k] != theirs[k]}
    if case == "mixtral":  # transformers reads llama.cpp's Mixtral (arch llama with experts) as a dense Llama
        assert (ours["model_type"], theirs["model_type"]) == ("mixtral", "llama") and differ == {"model_type"}
    else:
        assert theirs.keys() - ours.keys() <= _PROVENANCE and ours.keys() - theirs.keys() == set()
        assert differ == _FIXED_BY_US.get(case, set())
    assert ours["architectures"] == [type(source).__name__.replace("Config", "ForCausalLM")]
    loaded = type(source).from_dict(ours)  # as transformers reads the exported config.json
    for key in _SHAPE_KEYS:
        # qwen MoE files carry a dense FFN width that no layer of these models uses
        if hasattr(source, key) and not (key == "intermediate_size" and case in ("qwen2moe", "qwen3moe")):
            expected = getattr(source, key)
            if key == "head_dim" and expected is None:  # what None means (Mixtral)
                expected = source.hidden_size // source.num_attention_heads
            assert getattr(loaded, key) == expected, key
    assert loaded.rms_norm_eps == pytest.approx(source.rms_norm_eps, rel=1e-6)  # stored as float32
    assert loaded.rope_parameters == source.rope_parameters

    assert _tokenizer_parts(read_metadata(open_gguf(path))) == get_gguf_tokenizer(str(path))[1:]
    assert_same_tokenizer(gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
                          tmp_path)


def test_unsupported_architecture_and_missing_tokenizer_are_one_line_errors(tmp_path):
    from replaceme_jax.errors import ReplaceMeError

    config = hf_config("llama")
    write_dense_gguf_metadata(tmp_path / "falcon.gguf", "falcon", config, tokenizer=None)
    with pytest.raises(UnsupportedModelError, match=r"falcon\.gguf: unsupported GGUF architecture 'falcon'$"):
        load_model(tmp_path / "falcon.gguf")
    with pytest.raises(UnsupportedModelError, match=r"falcon\.gguf: unsupported GGUF architecture 'falcon'$"):
        gguf_tokenizer(tmp_path / "falcon.gguf")
    write_dense_gguf_metadata(tmp_path / "bare.gguf", "llama", config, tokenizer=None)
    with pytest.raises(ReplaceMeError, match=r"bare\.gguf: no tokenizer in the GGUF metadata$"):
        gguf_tokenizer(tmp_path / "bare.gguf")


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf(download=False) is None, reason="SmolLM2 GGUF not in the cache")
def test_real_smollm2_gguf_config_and_tokenizer_match_transformers(tmp_path):
    path = smollm2_gguf(download=False)
    ours = gguf_hf_config(path, open_gguf(path))
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    assert {k for k in ours.keys() & theirs.keys() - _PROVENANCE if ours[k] != theirs[k]} == set()
    assert theirs.keys() - ours.keys() <= _PROVENANCE and ours.keys() - theirs.keys() == set()
    assert_same_tokenizer(gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
                          tmp_path)
