"""Tiny random `transformers` models and tokenizers built in a temp dir (no hub, no files shipped)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "the a of and to in is was for on that with as by at from it his her an be are were this which "
    "city river music house garden model layer paper world water light stone night morning story "
    "people king queen game team song year time day north south east west small large old new"
).split()



def load_bench_script(name: str):
    """A ``bench/`` script as a module (``bench`` is not a package), so tests use its code, not a copy of it."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def devices_env(devices: int) -> dict:
    """The environment of a test subprocess that runs JAX on ``devices`` CPU devices: the suite's own XLA
    flags (tests/conftest.py) plus the device count, and the repository on the path."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


FAMILY_CONFIGS = {
    # name: (model_type, overrides)
    "llama_gqa_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_mha_untied_bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                            attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 2.0})),
    "mistral_sliding": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                        head_dim=8)),
    "qwen2_bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False)),
    "qwen3_sliding_layers": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                           use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}
# Gemma 2 / Gemma 3: small soft-caps and an odd query_pre_attn_scalar so that every Gemma-specific op
# changes the logits visibly; sliding windows of 4 tokens; Gemma 3 with a linearly scaled global rope.
GEMMA_CONFIGS = {
    "gemma2_softcap": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                      query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0)),
    "gemma2_untied_mha": ("gemma2", dict(num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                         sliding_window=5, tie_word_embeddings=False)),
    "gemma3_text": ("gemma3_text", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
                                        query_pre_attn_scalar=8, layer_types=[
                                            "sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1_000_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}
FAMILY_CONFIGS.update(GEMMA_CONFIGS)


def hf_config(model_type: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}[model_type]
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    if model_type == "mistral":
        base["sliding_window"] = None
    base.update(overrides)
    return cls(**base)


def make_tokenizer(directory: Path, vocab_size: int = 128):
    """A word-level tokenizer over WORDS (ids 0..3 special), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        if len(vocab) >= vocab_size:
            break
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


def make_model(directory: Path, model_type: str = "llama", seed: int = 0, dtype: str = "float32",
               tokenizer: bool = True, init_std: float = 0.2, **overrides):
    """Save a tiny random model (and tokenizer) to ``directory``; return the torch model."""
    return save_random_model(directory, hf_config(model_type, **overrides), seed, dtype, tokenizer, init_std)


def save_random_model(directory: Path, config, seed: int = 0, dtype: str = "float32", tokenizer: bool = True,
                      init_std: float = 0.2):
    """Random weights for ``config`` (any causal-LM family), saved with a tokenizer; return the torch model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config.initializer_range = init_std  # larger than default so layers differ visibly from identity
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at ones; perturb so that a mix-up of norms is caught
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(directory))
    if tokenizer:
        make_tokenizer(directory, config.vocab_size)
    return model


def read_safetensors(directory) -> dict:
    import os

    from safetensors import safe_open

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "numpy") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_safetensors(a, b) -> None:
    """The two directories hold the same tensor names, dtypes and bits."""
    before, after = read_safetensors(a), read_safetensors(b)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


def random_batch(vocab_size: int, lengths: list[int], seed: int = 0, pad_id: int = 0, left: bool = False):
    """Token ids [B, max(lengths)] padded with ``pad_id`` and the matching attention mask."""
    rng = np.random.default_rng(seed)
    s = max(lengths)
    ids = np.full((len(lengths), s), pad_id, np.int32)
    mask = np.zeros((len(lengths), s), np.int32)
    for row, n in enumerate(lengths):
        sl = slice(s - n, s) if left else slice(0, n)
        ids[row, sl] = rng.integers(4, vocab_size, n)
        mask[row, sl] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()
