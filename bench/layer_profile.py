"""Where one decoder layer's time goes, on this machine: the pieces of our jitted SmolLM2-shaped layer
(random weights) against transformers' ``LlamaDecoderLayer`` (SDPA attention) at the same shapes.

Each row is the median of ``--repeats`` timed calls after one warm-up call (compilation). FLOP/s are
analytic (2 per multiply-add; attention counts the full S x S, as in ``bench/accelerator.py``).
``attend: whole-[B, h, S, S] path`` is the attention as it was before it went in query blocks (the
general einsum path, which the KV cache still uses), ``attend`` the current whole-sequence path.

    PYTHONPATH=. python bench/layer_profile.py --out bench/results/layer_profile_cpu.json
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def ours(args) -> dict:
    import jax
    import jax.numpy as jnp

    from replaceme_jax import capture
    from replaceme_jax.models import attention, llama
    from replaceme_jax.models.common import init_params

    b, s, d, inter, heads, kv = args.batch, args.length, args.hidden, args.intermediate, args.heads, args.kv_heads
    hd = d // heads
    config = llama.config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": d,
                                   "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
                                   "num_key_value_heads": kv, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                                   "max_position_embeddings": max(2048, s)})
    layer = init_params(llama.param_specs(config), jax.random.key(0))["layers"][0]
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((b, s, d)).astype(np.float32))
    mask = jnp.ones((b, s), jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, s, heads, hd)).astype(np.float32))
    k, v = (jnp.asarray(rng.standard_normal((b, kv, s, hd)).astype(np.float32)) for _ in range(2))
    positions = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
    valid = mask.astype(bool)

    def attend(whole_sequence):
        return jax.jit(lambda q, k, v: attention.attend(
            q, k, v, scale=hd ** -0.5, q_positions=positions, k_positions=positions, key_valid=valid,
            whole_sequence=whole_sequence, implementation="einsum"))

    def attention_block(p, x, m):
        return llama._attention(p, config, x, llama.attention_context(config, m.shape, m), None)

    tokens = b * s
    core_flops = tokens * 4 * s * d
    projection_flops = tokens * 2 * (2 * d * d + 2 * d * kv * hd)
    mlp_flops = tokens * 2 * 3 * d * inter
    _, y, m = capture._layer_step(layer, h, mask, config=config, layer_index=0, branches=True)
    pieces = {
        "layer": (lambda: capture._layer_step(layer, h, mask, config=config, layer_index=0, branches=True),
                  projection_flops + core_flops + mlp_flops),
        "mlp": (lambda f=jax.jit(llama._mlp): f(layer["mlp"], h), mlp_flops),
        "attention with projections": (lambda f=jax.jit(attention_block): f(layer["self_attn"], h, mask),
                                       projection_flops + core_flops),
        "attend": (lambda f=attend(True): f(q, k, v), core_flops),
        "attend: whole-[B, h, S, S] path": (lambda f=attend(False): f(q, k, v), core_flops),
        "statistics of one block (A and B)": (
            lambda f=jax.jit(lambda m, y, e, a: capture.block_sums(m, y, e, a, capture.RowPolicy())): f(m, y, h, mask),
            4 * tokens * d * d),
    }
    out = {}
    with jax.default_matmul_precision("highest"):  # as run_capture runs
        for name, (call, flops) in pieces.items():
            seconds = median_seconds(lambda: jax.block_until_ready(call()), args.repeats)
            out[name] = {"ms": round(seconds * 1e3, 1), "gflop_per_s": round(flops / seconds / 1e9, 1)}
    return out


def reference(args) -> dict:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    if args.threads:
        torch.set_num_threads(args.threads)
    b, s, d, inter, heads, kv = args.batch, args.length, args.hidden, args.intermediate, args.heads, args.kv_heads
    hd = d // heads
    config = LlamaConfig(hidden_size=d, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                         num_hidden_layers=1, rope_theta=100000.0, max_position_embeddings=max(2048, s))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).eval()
    h = torch.randn(b, s, d)
    positions = torch.arange(s)[None].expand(b, s)
    rope = LlamaRotaryEmbedding(config)(h, positions)
    q = torch.randn(b, heads, s, hd)
    k, v = (torch.randn(b, kv, s, hd).repeat_interleave(heads // kv, 1) for _ in range(2))
    tokens = b * s
    pieces = {
        "layer": (lambda: layer(h, attention_mask=None, position_embeddings=rope, position_ids=positions),
                  tokens * 2 * (2 * d * d + 2 * d * kv * hd + 3 * d * inter) + tokens * 4 * s * d),
        "mlp": (lambda: layer.mlp(h), tokens * 2 * 3 * d * inter),
        "attend (sdpa, causal)": (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                  tokens * 4 * s * d),
    }
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with torch.no_grad():
        for name, (call, flops) in pieces.items():
            seconds = median_seconds(call, args.repeats)
            out[name] = {"ms": round(seconds * 1e3, 1), "gflop_per_s": round(flops / seconds / 1e9, 1)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sides", default="ours,reference")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = {"args": vars(args), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "loadavg_before": os.getloadavg()}
    if "ours" in args.sides:
        result["ours"] = ours(args)
    if "reference" in args.sides:
        result["reference"] = reference(args)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
