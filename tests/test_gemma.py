"""Gemma 2 / Gemma 3 (issue 13): HF and GGUF input, export after layer removal, ReplaceMe through the
post-MLP norm, and the real Gemma 3 270M checkpoint against transformers.

Logit parity of the tiny models and KV-cached generation are in test_model_parity.py and
test_generate.py (GEMMA_CONFIGS are part of FAMILY_CONFIGS).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from replaceme_jax.conversion import export_hf, load_model, load_tokenizer
from replaceme_jax.conversion.assets import gemma3_270m_gguf
from replaceme_jax.conversion.gguf_metadata import gguf_hf_config, gguf_tokenizer, open_gguf
from replaceme_jax.errors import UnsupportedModelError
from replaceme_jax.models import family_for, gemma
from replaceme_jax.replaceme.merge import replace_block
from tests.helpers import GEMMA_CONFIGS, assert_same_safetensors, make_model, random_batch, torch_logits
from tests.test_gguf import add_tokenizer, assert_same_tokenizer, gguf_tokenizer_fields

# float32 on both sides; 3 layers with logits of magnitude ~1-5: ~3e-6 observed (test_model_parity).
ATOL = 1e-4


def ours_logits(model, ids, mask, params=None, config=None):
    config = config or model.config
    with jax.default_matmul_precision("highest"):
        return np.asarray(family_for(config.model_type).forward(params or model.params, config, ids, mask).logits)


# --- HF directories ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GEMMA_CONFIGS))
def test_hf_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, name):
    model_type, overrides = GEMMA_CONFIGS[name]
    reference = make_model(tmp_path / "hf", model_type, **overrides)
    model = load_model(tmp_path / "hf")
    export_hf(model, tmp_path / "out")
    assert_same_safetensors(tmp_path / "hf", tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask = random_batch(model.config.vocab_size, [9, 4], seed=0)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(reference, ids, mask))


def test_transformers_4_spelling_of_gemma3_config_is_read():
    """4.x writes rope_theta / rope_local_base_freq / rope_scaling and sliding_window_pattern instead of
    nested rope_parameters and layer_types."""
    cfg = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
           "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 8,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 6,
           "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh"}
    c = gemma.config_from_hf(cfg)
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (c.rope_theta, c.rope_type, dict(c.rope_params)) == (1e6, "linear", {"factor": 8.0})
    assert (c.local_rope_theta, c.local_rope_type) == (1e4, "default")
    new = transformers_config(cfg)
    assert [new.layer_types[i] for i in range(7)] == list(c.layer_types)
    assert new.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}


def transformers_config(cfg):
    import transformers

    return transformers.Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


@pytest.mark.parametrize("changes,message", [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma3"}, "image-text"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "rope scaling type 'yarn'"),
    ({"some_new_field": 1}, "unsupported config field"),
])
def test_unsupported_gemma_configs_are_refused(changes, message):
    cfg = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16, "sliding_window": 8} | changes
    with pytest.raises(UnsupportedModelError, match=message):
        family_for("gemma3_text").config_from_hf(cfg)


# --- export after layers are removed ------------------------------------------------------------------


# gemma2 (every 2nd layer global): removing layer 2 of s f s f s f s breaks the alternation, so the
# pattern key goes; gemma3 (transformers writes _sliding_window_pattern: 6): removing 2-3 of
# s s s s s f s leaves s s s f s, "every 4th", which is written back.
@pytest.mark.parametrize("name,block,pattern", [("gemma2_softcap", (2, 3), None), ("gemma3_text", (2, 4), 4)])
def test_pruned_export_rewrites_layer_types_and_matches_transformers(tmp_path, name, block, pattern):
    model_type, overrides = GEMMA_CONFIGS[name]
    overrides = dict(overrides, num_hidden_layers=7)
    overrides.pop("layer_types", None)  # transformers' default pattern, which the export must rewrite
    make_model(tmp_path / "hf", model_type, tokenizer=False, **overrides)
    if model_type == "gemma2":  # as transformers 4.x configs of Gemma 2 say it
        source = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps(source | {"sliding_window_pattern": 2}))
    model = load_model(tmp_path / "hf")
    before = list(model.config.layer_types)
    params, config = replace_block(model.params, model.config, *block, None)
    pruned = type(model)(**{**model.__dict__, "params": params, "config": config})
    export_hf(pruned, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 7 - (block[1] - block[0])
    assert written["layer_types"] == before[:block[0]] + before[block[1]:]
    present = {key: written[key] for key in ("sliding_window_pattern", "_sliding_window_pattern") if key in written}
    assert set(present.values()) == ({pattern} if pattern else set())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert list(reloaded.config.layer_types) == written["layer_types"]
    ids, mask = random_batch(config.vocab_size, [12, 7], seed=2)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours_logits(model, ids, mask, params, config)[valid],
                               torch_logits(reloaded, ids, mask)[valid], atol=ATOL)


def test_sliding_window_pattern_is_kept_when_the_kept_layers_follow_one():
    c = gemma.config_from_hf({"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32,
                              "intermediate_size": 64, "num_hidden_layers": 12, "num_attention_heads": 2,
                              "head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 6})
    kept = c.with_layers([i for i in range(12) if i not in (6, 7, 8, 9, 10, 11)])
    assert gemma.config_to_hf_updates(kept)["sliding_window_pattern"].value == 6


# --- GGUF ---------------------------------------------------------------------------------------------

_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gemma_gguf(path, model, config, arch, tokenizer="llama"):
    """What llama.cpp's converter writes for gemma2 / gemma3: F32 tensors, norms as 1 + w, Q/K unpermuted."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    add_tokenizer(writer, tokenizer)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    rope = config.rope_parameters
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding matrix
        w = tensor.float().numpy()
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{_GGUF_PER_LAYER[rest]}"
        else:
            name = _GGUF_NAMES[key]
        if name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# What a GGUF can say: transformers' default layer pattern, Gemma 3's default local rope, and
# llama.cpp's attention scale 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim).
GGUF_CASES = {
    "gemma2": ("gemma2", dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=7, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   query_pre_attn_scalar=16, sliding_window=4)),
}


@pytest.mark.parametrize("arch", sorted(GGUF_CASES))
def test_gguf_loads_to_the_weights_and_logits_transformers_gives(tmp_path, arch):
    model_type, overrides = GGUF_CASES[arch]
    vocab = len(gguf_tokenizer_fields("llama")["tokens"])  # the file's vocabulary is its token list
    reference = make_model(tmp_path / "hf", model_type, tokenizer=False, vocab_size=vocab, **overrides)
    (tmp_path / "gguf").mkdir()
    path = tmp_path / "gguf" / "model.gguf"
    write_gemma_gguf(path, reference, reference.config, arch)
    ours = load_model(path)
    assert ours.config.model_type == model_type
    from_hf = load_model(tmp_path / "hf")
    assert ours.config.rms_norm_eps == pytest.approx(from_hf.config.rms_norm_eps, rel=1e-6)  # float32 in the file
    assert ours.config == dataclasses.replace(from_hf.config, rms_norm_eps=ours.config.rms_norm_eps)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = theirs.state_dict()
    # norms: both read (1 + w) - 1 in float32, so both differ from w by the same rounding
    np.testing.assert_array_equal(np.asarray(ours.params["layers"][1]["post_feedforward_layernorm"]["scale"]),
                                  state["model.layers.1.post_feedforward_layernorm.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(ours.params["layers"][1]["self_attn"]["q_proj"]["kernel"]),
                                  state["model.layers.1.self_attn.q_proj.weight"].numpy().T)
    ids, mask = random_batch(ours.config.vocab_size, [12, 5], seed=0)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours_logits(ours, ids, mask)[valid], torch_logits(reference, ids, mask)[valid],
                               atol=ATOL)
    # the config and tokenizer as transformers reads the file, apart from what transformers gets wrong
    ours_cfg = gguf_hf_config(path, open_gguf(path))
    theirs_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    differ = {k for k in ours_cfg.keys() & theirs_cfg.keys() if ours_cfg[k] != theirs_cfg[k]}
    # transformers: query_pre_attn_scalar 256 whatever the head size, Gemma 2's soft-caps from its class
    # defaults, architectures None; the rest is where it read the file from
    assert differ <= {"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                      "architectures", "_name_or_path", "_model_name_or_path"}
    assert "query_pre_attn_scalar" in differ
    assert ours_cfg["architectures"] == [{"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]]
    assert_same_tokenizer(gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
                          tmp_path)
    # and it exports as a plain HF Gemma with the same logits
    export_hf(ours, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask)[valid], ours_logits(ours, ids, mask)[valid],
                               atol=ATOL)


def test_gemma_27b_attention_scale_and_gemma3_rope_scaling_from_gguf_metadata():
    from replaceme_jax.conversion.gguf_metadata import _gemma_derived

    fields = {"head_dim": 128, "hidden_size": 5376, "num_attention_heads": 32, "num_hidden_layers": 62}
    assert _gemma_derived("gemma3", {}, fields) == {"query_pre_attn_scalar": 168}
    metadata = {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    assert _gemma_derived("gemma3", metadata, dict(fields, num_hidden_layers=34)) == {
        "query_pre_attn_scalar": 128, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}


# --- the real Gemma 3 270M -----------------------------------------------------------------------------

REAL_PROMPT = "The capital of France is"


@pytest.mark.slow
@pytest.mark.skipif(gemma3_270m_gguf(download=False) is None, reason="Gemma 3 270M GGUF not in the cache")
def test_real_gemma3_270m_gguf_matches_transformers(tmp_path):
    from replaceme_jax.generate import Sampling, generate

    path = gemma3_270m_gguf(download=False)
    model = load_model(path)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.sliding_window) == ("gemma3_text", 18, 640, 512)
    assert c.layer_types.count("full_attention") == 3 and c.tie_word_embeddings
    tokenizer = load_tokenizer(model)
    prompt = tokenizer(REAL_PROMPT)["input_ids"]
    assert prompt == [2, 818, 5279, 529, 7001, 563]
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # a padded batch of real text past the 512-token sliding window
    text = " ".join(["Paris is the capital and most populous city of France, on the Seine."] * 60)
    long = tokenizer(text)["input_ids"][:600]
    ids = np.zeros((3, 600), np.int32)
    mask = np.zeros((3, 600), np.int32)
    for row, seq in enumerate([long, long[:350], prompt]):
        ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    # Full logits would be 3 x 600 x 262,144 floats (1.9 GB) per framework, several times over inside
    # torch (14 GB peak, enough to take CI's memory with the other worker): compare at every 5th position
    # and around the window edge, from the same padded batch.
    keep = np.unique(np.concatenate([np.arange(0, 600, 5), np.arange(505, 520), [349, 350, 599]]))
    valid = mask[:, keep].astype(bool)
    with jax.default_matmul_precision("highest"):
        h_last = gemma.forward(model.params, c, ids, mask, collect_layers=True, compute_logits=False).hidden_states[-1]
        ours = np.asarray(gemma.lm_head(model.params, c, gemma.final_norm(model.params, c, h_last[:, keep])))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           logits_to_keep=torch.tensor(keep)).logits.float().numpy()
    # 18 float32 layers, logits up to ~60: the two frameworks' summation orders differ by ~3e-6 relative
    # (2e-4 absolute on the longest rows was the most observed); 1e-5 relative to the largest logit.
    scale = np.abs(theirs[valid]).max()
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-5 * scale, rtol=0)
    # greedy continuation with the KV-cache sampler
    tokens, lengths = generate(model.params, c, [prompt], 12, jax.random.key(0), sampling=Sampling(temperature=0.0),
                               eos_ids=[tokenizer.eos_token_id], pad_id=0)
    text = tokenizer.decode(tokens[0, len(prompt):lengths[0]].tolist(), skip_special_tokens=True)
    assert text.startswith(" the capital of the country of France. It is the largest")
    # export: a plain HF Gemma 3 with the same logits
    export_hf(model, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    short = ids[2:, :len(prompt)], mask[2:, :len(prompt)]
    np.testing.assert_allclose(torch_logits(reloaded, *short), torch_logits(reference, *short), atol=1e-4)


# --- ReplaceMe through the post-MLP norm ---------------------------------------------------------------


def _realizable_map(layer, rng, dim):
    """A map of the form diag(g)^-1 Q diag(s) (Q orthogonal): what folds exactly."""
    g = 1.0 + np.asarray(layer["post_feedforward_layernorm"]["scale"], np.float64)
    Q = np.linalg.qr(np.eye(dim) + 0.3 * rng.standard_normal((dim, dim)))[0]
    s = 1.0 + 0.5 * rng.random(dim)
    return (Q * s[None, :]) / g[:, None]


@pytest.mark.parametrize("name", ["gemma2_softcap", "gemma3_text"])
def test_merged_model_equals_explicit_map_for_maps_the_norm_allows(tmp_path, name):
    """T = diag(g)^-1 Q diag(s) folds exactly: Q into down_proj (RMSNorm(z Q) = RMSNorm(z) Q), s into the
    post-MLP norm; the merged model is the unmerged one with M T applied explicitly."""
    from tests.test_model_parity import forward_with_explicit_map

    model_type, overrides = GEMMA_CONFIGS[name]
    make_model(tmp_path, model_type, tokenizer=False, **dict(overrides, num_hidden_layers=4, layer_types=None))
    model = load_model(tmp_path)
    T = _realizable_map(model.params["layers"][1], np.random.default_rng(0), 32)
    assert np.allclose(gemma.realizable_output_map(model.params["layers"][1], model.config, T), T)
    params, config = replace_block(model.params, model.config, 2, 3, T)
    ids, mask = random_batch(model.config.vocab_size, [16, 9], seed=1)
    with jax.default_matmul_precision("highest"):
        merged = np.asarray(family_for(model_type).forward(params, config, ids, mask).logits)
        explicit = np.asarray(forward_with_explicit_map(model.params, model.config, ids, mask, 2, 3, T))
    valid = mask.astype(bool)
    # float32 rounding of (z W) Q against z (W Q) and of the folded scale
    np.testing.assert_allclose(merged[valid], explicit[valid], atol=2e-5)


def test_other_maps_are_replaced_by_the_realizable_one_validation_scores(tmp_path):
    """A T the norm cannot carry is written as ``realizable_output_map(T)``, and the held-out
    evaluator scores exactly that map: its perplexity is the merged model's."""
    from replaceme_jax.replaceme.validation import HeldoutEvaluator, sequence_nll
    from replaceme_jax.replaceme.validation import perplexity as ppl
    from tests.test_model_parity import forward_with_explicit_map

    model_type, overrides = GEMMA_CONFIGS["gemma3_text"]
    make_model(tmp_path, model_type, tokenizer=False, **dict(overrides, num_hidden_layers=4, layer_types=None))
    model = load_model(tmp_path)
    layer = model.params["layers"][1]
    T = np.eye(32) + 0.2 * np.random.default_rng(0).standard_normal((32, 32))
    R = gemma.realizable_output_map(layer, model.config, T)
    assert not np.allclose(R, T) and gemma.decompose_output_map(layer, model.config, R) is not None
    params, config = replace_block(model.params, model.config, 2, 3, T)
    ids, mask = random_batch(model.config.vocab_size, [16, 9], seed=1)
    with jax.default_matmul_precision("highest"):
        merged = np.asarray(family_for(model_type).forward(params, config, ids, mask).logits)
        explicit = np.asarray(forward_with_explicit_map(model.params, model.config, ids, mask, 2, 3, R))
    valid = mask.astype(bool)
    np.testing.assert_allclose(merged[valid], explicit[valid], atol=2e-5)

    class Batch:
        input_ids, attention_mask = ids, mask

    sequences = [ids[r, :int(mask[r].sum())] for r in range(len(ids))]
    evaluator = HeldoutEvaluator(model.params, model.config, 2, 3, [Batch])
    assert evaluator.perplexity(T) == pytest.approx(ppl(*sequence_nll(params, config, sequences)), rel=1e-5)


def test_orthogonal_scaled_fit_recovers_a_planted_map_and_beats_the_data_free_projection():
    rng = np.random.default_rng(0)
    n, d = 2000, 16
    R = rng.standard_normal((n, d)) * np.linspace(0.2, 3.0, d)[None, :]  # anisotropic rows
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    s = 0.5 + rng.random(d)
    target = R @ Q * s[None, :]
    A, B = R.T @ R, R.T @ target
    Q_fit, s_fit = gemma.fit_orthogonal_scaled(A, B, np.eye(d), iterations=500)
    np.testing.assert_allclose((Q_fit * s_fit) , Q * s, atol=1e-6)
    # with noise the data-aware fit is at least as good as projecting the unconstrained lstsq map
    noisy = target + 0.5 * rng.standard_normal((n, d))
    A, B = R.T @ R, R.T @ noisy
    T_free = np.linalg.solve(A, B)
    layer = {"post_feedforward_layernorm": {"scale": np.zeros(d)}}
    err = lambda T: np.sum((R @ T - noisy) ** 2)  # noqa: E731
    fitted = gemma.realizable_output_map(layer, None, T_free, A, B)
    projected = gemma.realizable_output_map(layer, None, T_free)
    assert err(fitted) <= err(projected) + 1e-9 and err(T_free) <= err(fitted)


@pytest.mark.parametrize("name", ["gemma2_softcap", "gemma3_text"])
def test_compress_writes_a_plain_gemma_whose_logits_are_the_validated_model(tmp_path, name):
    """The whole pipeline on a tiny Gemma: the exported directory is a Gemma transformers loads, with the
    block removed, and its held-out perplexity is the one validation reported for the chosen T."""
    from replaceme_jax.replaceme.pipeline import compress
    from tests.test_replaceme import run_config

    model_type, overrides = GEMMA_CONFIGS[name]
    make_model(tmp_path / "m", model_type, **dict(overrides, num_hidden_layers=6, layer_types=None))
    result = compress(run_config(tmp_path, tmp_path / "m", first_token_rows="exclude", alpha=0.1))
    (start, end), = result.report["blocks"]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert pruned.config.num_hidden_layers == 4 and type(pruned).__name__.startswith("Gemma")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = load_model(tmp_path / "m")
    assert written["layer_types"] == [t for i, t in enumerate(original.config.layer_types) if not start <= i < end]
    block = result.blocks[0]
    ours = load_model(tmp_path / "out")
    expected, config = replace_block(original.params, original.config, start, end, block.T)
    ids, mask = random_batch(original.config.vocab_size, [14, 6], seed=3)
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(pruned, ids, mask)[valid],
                               ours_logits(original, ids, mask, expected, config)[valid], atol=ATOL)
    if block.T is not None:  # the T fitted and validated is already a map the norm can carry
        layer = original.params["layers"][start - 1]
        assert gemma.decompose_output_map(layer, original.config, block.T) is not None


def test_refine_on_gemma_writes_a_map_the_norm_can_carry(tmp_path):
    """refine: kl moves T freely; on Gemma the refined T is replaced by the foldable map nearest to it
    (before held-out validation, when there is one), so the T kept is the one written: the unconstrained
    one would be folded inexactly. No held-out split here, so the refined T is always kept."""
    from replaceme_jax.replaceme.pipeline import compress
    from tests.test_replaceme import run_config

    model_type, overrides = GEMMA_CONFIGS["gemma3_text"]
    make_model(tmp_path / "m", model_type, **dict(overrides, num_hidden_layers=6, layer_types=None))
    result = compress(run_config(tmp_path, tmp_path / "m", first_token_rows="exclude", alpha=0.1,
                                 validation_fraction=0.0, refine="kl", refine_steps=4))
    (start, _), = result.report["blocks"]
    block = result.blocks[0]
    refine = block.solver["refine"]
    assert refine["projected_to_foldable"] and refine["kept"], refine
    original = load_model(tmp_path / "m")
    assert gemma.decompose_output_map(original.params["layers"][start - 1], original.config, block.T) is not None
