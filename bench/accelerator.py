"""The accelerator benchmark, one command: our capture pass 1 against the reference's passes
(``bench/reference_pipeline_torch.py``, torch/transformers) on the same model, the same token batches
and the same device kind, in one run; each side's time and useful FLOP/s.

Ours: ``capture.run_capture`` with what ``compress`` runs in pass 1 when the statistics fit in memory:
the angular distance of every candidate block (s, s + n), s >= 1, and the normal equations of every
one of them, from one forward per batch without the LM head. Timed as the first batch (compilation
included) and the later batches (compiled). The reference: its distance pass (a full forward with
the LM head and every hidden state per batch) and its statistics pass (a second full forward, one
block's float64 sums), on the same ids (its tokenizer call replaced by the prepared batches).

FLOPs are counted analytically (2 per multiply-add) for what each side must compute: projections and
MLP 2 x params per token, attention scores and values 4 x S x heads x head_dim per token (the full S x S,
as both sides compute it), the LM head 2 x D x V per token, and for the statistics 4 x D^2 per row and
block (A and B; the reference's in float64). "Useful FLOP/s" divides them by the wall time.

Without ``--model`` both sides load one random llama saved to a temporary HF directory, SmolLM2-135M's
shapes by default (30 layers, D 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49,152); ``--model``
takes an HF directory or a GGUF file instead (e.g. ~/.cache/replaceme_jax/SmolLM2-135M-Instruct.Q4_1.gguf;
the FLOP count reads an HF directory's config.json, and for a GGUF the shape flags, which must match it).

    # the GPU run (the GPU benchmark issue): SmolLM2 shapes, 32 batches of 8 x 512
    PYTHONPATH=. python bench/accelerator.py --batches 32 --out bench/results/accelerator_gpu.json
    # the CPU smoke run
    PYTHONPATH=. python bench/accelerator.py --layers 4 --batches 2 --batch 2 --length 64 \\
        --out bench/results/accelerator_cpu_small.json
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_model(args, directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.length),
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(directory))


def token_batches(args, vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(0, vocab, (args.batch, args.length)).astype(np.int32),
             np.ones((args.batch, args.length), np.int32)) for _ in range(args.batches)]


def forward_flops(tokens: int, length: int, dim: int, inter: int, heads: int, kv_heads: int, head_dim: int,
                  layers: int, vocab: int, lm_head: bool) -> float:
    per_layer = 2 * (dim * heads * head_dim * 2 + dim * kv_heads * head_dim * 2 + 3 * dim * inter)
    attention = 4 * length * heads * head_dim
    return tokens * (layers * (per_layer + attention) + (2 * dim * vocab if lm_head else 0))


def ours(args, model_path: str, batches, n: int) -> dict:
    import jax

    from replaceme_jax.capture import CaptureSpec, RowPolicy, run_capture
    from replaceme_jax.conversion.model_io import load_model
    from replaceme_jax.data.batching import Batch
    from replaceme_jax.replaceme.selection import candidate_starts

    model = load_model(model_path, dtype=args.dtype)
    jax.block_until_ready(model.params)
    layers = model.config.num_hidden_layers
    starts = candidate_starts(layers, n)
    spec = CaptureSpec(distance_starts=tuple(starts), distance_n=n, stats_blocks=tuple((s, s + n) for s in starts),
                       rows=RowPolicy())
    wrapped = [Batch(input_ids=i, attention_mask=m, n_real_rows=len(i), rows=tuple(range(len(i)))) for i, m in batches]

    def run(bs):
        began = time.perf_counter()
        acc = run_capture(model.params, model.config, spec, bs)
        distances = acc.distances()
        _ = acc.block_equations(0).A  # the sums on the host
        return time.perf_counter() - began, distances

    first, first_distances = run(wrapped[:1])
    rest, distances = run(wrapped[1:]) if len(wrapped) > 1 else (float("nan"), first_distances)
    k = len(wrapped)  # batches of equal size: the mean over all is the weighted mean of the two runs
    distance = (first_distances[starts[0]] + (k - 1) * distances[starts[0]]) / k
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "first_batch_s": first, "later_batches_s": rest, "later_batches": k - 1,
            "num_layers": layers, "blocks": len(starts), "distance_first_start": distance}


def reference(args, model_path: str, batches, n: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import reference_pipeline_torch as ref

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ref.load_model(model_path, ref.DTYPES[args.dtype], device)
    ref.tokenize = lambda tokenizer, batch, max_length, device_: batch  # the prepared ids, not texts
    prepared = [{"input_ids": torch.as_tensor(i, dtype=torch.long, device=device),
                 "attention_mask": torch.as_tensor(m, dtype=torch.long, device=device)} for i, m in batches]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    began = time.perf_counter()
    distances = ref.distance_pass(model, None, prepared, args.length, n, device, collect=False)
    sync()
    distance_s = time.perf_counter() - began
    start = min((l for l in distances if l >= 1), key=lambda l: (distances[l], l))
    began = time.perf_counter()
    ref.statistics_pass(model, None, prepared, args.length, start, start + n, device)
    sync()
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "distance_pass_s": distance_s, "statistics_pass_s": time.perf_counter() - began,
            "distance_first_start": distances[1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF directory or GGUF file (default: a random llama of the shapes below)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8, help="the first is timed apart (compilation)")
    parser.add_argument("--layers-to-skip", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"], help="reference: cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--sides", default="ours,reference")
    parser.add_argument("--out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            model_path = str(Path(tmp) / "model")
            random_model(args, Path(model_path))
        config_file = Path(model_path) / "config.json"
        hf = json.loads(config_file.read_text()) if config_file.is_file() else {}  # a GGUF: the shape flags
        dim = hf.get("hidden_size", args.hidden)
        heads = hf.get("num_attention_heads", args.heads)
        shape = dict(dim=dim, inter=hf.get("intermediate_size", args.intermediate), heads=heads,
                     kv_heads=hf.get("num_key_value_heads", args.kv_heads), head_dim=hf.get("head_dim", dim // heads),
                     layers=hf.get("num_hidden_layers", args.layers), vocab=hf.get("vocab_size", args.vocab))
        batches = token_batches(args, shape["vocab"])
        n = args.layers_to_skip
        result = {"args": vars(args), "shape": shape, "machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
        tokens = args.batch * args.length
        blocks = shape["layers"] - n  # starts 1 .. L - n
        stats = 4 * tokens * shape["dim"] ** 2
        if "ours" in args.sides:
            result["ours"] = r = ours(args, model_path, batches, n)
            flops = forward_flops(tokens, args.length, lm_head=False, **shape) + blocks * stats
            r["flops_per_batch"] = flops
            r["flop_per_s_compiled"] = flops / (r["later_batches_s"] / max(r["later_batches"], 1))
            r["flop_per_s_with_compile"] = flops * args.batches / (r["first_batch_s"] + r["later_batches_s"])
        if "reference" in args.sides:
            result["reference"] = r = reference(args, model_path, batches, n)
            forward = forward_flops(tokens, args.length, lm_head=True, **shape)
            r["distance_flop_per_s"] = forward * args.batches / r["distance_pass_s"]
            r["statistics_flop_per_s"] = (forward + stats) * args.batches / r["statistics_pass_s"]
        if "ours" in result and "reference" in result:
            ours_total = result["ours"]["first_batch_s"] + result["ours"]["later_batches_s"]
            ref_total = result["reference"]["distance_pass_s"] + result["reference"]["statistics_pass_s"]
            result["reference_two_passes_over_ours_one"] = ref_total / ours_total
        result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
