"""The reference ReplaceMe lstsq pipeline, re-implemented faithfully in PyTorch/transformers (the baseline).

It repeats what the reference code (mts-ai/ReplaceMe: `distance.py`, `lstsq.py`, `utils.py`) computes and
how, so that our tool can be timed against it on the same machine:

* data: the first ``--size`` rows of the column, in file order (no sorting, no blank filtering), in
  batches of ``--batch-size`` with the incomplete last batch dropped (``DataLoader(drop_last=True)``),
  each batch tokenized by ``tokenizer(batch, padding="longest", max_length, truncation=True)`` (the
  tokenizer's own special tokens and padding side; pad = EOS when the tokenizer has no pad token);
* pass 1 (distances): a full forward per batch with ``output_hidden_states=True`` and full LM-head
  logits; angular distance ``arccos(cos)/pi`` between ``hidden_states[l]`` and ``hidden_states[l+n]`` on
  the last non-pad token of each sequence, in the model dtype, averaged per batch and then over
  batches. ``hidden_states[L]`` is transformers' post-final-norm state (the reference's quirk when a
  block ends at the last layer). The block start is the argmin over ``l >= 1`` (the profile for
  ``l = 0`` is reported too);
* pass 2 (statistics): a second full forward per batch; a forward hook on ``layers[start-1].mlp``
  captures ``M``; ``Y = hidden_states[start] - M``; the target ``hidden_states[end] - Y`` (post-norm when
  ``end == L``, as in the reference); rows are every position *including pad*; ``A += M^T M`` and
  ``B += M^T (h_end - Y)`` in float64 on the compute device;
* solve: ``T = solve(A + alpha I, B)`` in float64 (``--solver inv`` uses the reference's explicit
  ``inv(A + alpha I) @ B``);
* merge: a fresh copy of the model on CPU (the reference reloads it, in bfloat16), the block's layers
  deleted, ``down_proj.weight = (T^T @ W.double()).to(merge dtype)`` for layer ``start - 1``.

Every step is timed (``time.perf_counter``, ``torch.cuda.synchronize`` on CUDA) with the process's peak
RSS and, on CUDA, the step's peak ``torch.cuda.max_memory_allocated``. A JSON summary is printed (and
written to ``--output``); T is written to ``--save-transform`` (key ``T``, float64, as in
``shared/data/reference/smollm2_n8_lstsq_T.safetensors``).

    python bench/reference_pipeline_torch.py \\
        --model ~/.cache/replaceme_jax/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/data/calibration/c4_sample.jsonl --column text --size 256 --batch-size 8 \\
        --max-length 512 --layers-to-skip 8 --device cpu --dtype float32 \\
        --save-transform bench/results/reference_torch_T.safetensors \\
        --output bench/results/reference_pipeline_torch.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class Steps:
    """Wall time, peak RSS and (CUDA) peak allocated memory of each named step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_cuda_mb: dict[str, float] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = round(time.perf_counter() - start, 3)
        # ru_maxrss is in KiB on Linux (bytes on macOS)
        scale = 1024.0 if sys.platform != "darwin" else 1.0
        self.peak_rss_mb[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
        if self.device.type == "cuda":
            self.peak_cuda_mb[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        print(f"[{name}] {self.seconds[name]:.2f} s, peak RSS {self.peak_rss_mb[name]:.0f} MB"
              + (f", peak CUDA {self.peak_cuda_mb[name]:.0f} MB" if name in self.peak_cuda_mb else ""),
              file=sys.stderr, flush=True)


def _source(model: str) -> tuple[str, dict]:
    """(directory, from_pretrained kwargs) for an HF directory or a .gguf file."""
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_model(model: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    directory, extra = _source(model)
    m = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **extra)
    return m.to(device).eval()


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    directory, extra = _source(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
    if not tokenizer.pad_token:  # the reference's rule
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_texts(path: str, column: str, size: int | None) -> list[str]:
    """The first ``size`` rows of a .jsonl (or .txt: one row a line) file, unfiltered, like ``select(range(size))``."""
    texts = []
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for line in f:
            if size is not None and len(texts) >= size:
                break
            if path.endswith(".txt"):
                texts.append(line.rstrip("\n"))
            elif line.strip():
                texts.append(json.loads(line)[column])
    return texts


def batches_of(texts: list[str], batch_size: int) -> list[list[str]]:
    """``DataLoader(texts, batch_size, shuffle=False, drop_last=True)``."""
    usable = len(texts) - len(texts) % batch_size
    return [texts[i : i + batch_size] for i in range(0, usable, batch_size)]


def tokenize(tokenizer, batch: list[str], max_length: int, device: torch.device) -> dict:
    inputs = tokenizer(batch, return_tensors="pt", padding="longest", max_length=max_length, truncation=True)
    return {k: v.to(device) for k, v in inputs.items()}


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's ``utils.angular_distance`` (in the tensors' dtype, no epsilon)."""
    x = x / torch.norm(x, dim=-1, keepdim=True)
    y = y / torch.norm(y, dim=-1, keepdim=True)
    return torch.acos((x * y).sum(-1).clamp(min=-1, max=1)) / torch.pi


def last_non_pad(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden[b, last index where mask is 1] for each row b (the reference's ``mask.nonzero()[-1]``)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def distance_pass(model, tokenizer, batches, max_length: int, n: int, device: torch.device,
                  collect: bool = True) -> dict[int, float]:
    """Mean over batches of the per-batch mean angular distance, for every start l in 0..L-n."""
    num_layers = model.config.num_hidden_layers
    per_batch: dict[int, list[float]] = {l: [] for l in range(num_layers - n + 1)}
    for i, batch in enumerate(batches):
        inputs = tokenize(tokenizer, batch, max_length, device)
        with torch.no_grad():
            outputs = model(**inputs, output_hidden_states=True)  # full logits, as the reference
        last = [last_non_pad(h, inputs["attention_mask"]) for h in outputs.hidden_states]
        for l in per_batch:
            per_batch[l].append(angular_distance(last[l], last[l + n]).mean().item())
        del outputs, last
        if collect:  # the reference's distance loop does both after every batch (~0.1-0.2 s each on CPU)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"\rdistances: batch {i + 1}/{len(batches)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {l: float(np.mean(v)) for l, v in per_batch.items()}


def statistics_pass(model, tokenizer, batches, max_length: int, start: int, end: int, device: torch.device):
    """float64 sums A = M^T M, B = M^T (h_end - Y) over every row (pad included), plus the error sums and counts."""
    dim = model.config.hidden_size
    captured = {}
    hook = model.model.layers[start - 1].mlp.register_forward_hook(
        lambda module, args, output: captured.__setitem__("M", output.detach()))
    A = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    B = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    target_sq = torch.zeros((), dtype=torch.float64, device=device)
    end_sq = torch.zeros((), dtype=torch.float64, device=device)
    rows = real_tokens = 0
    try:
        for i, batch in enumerate(batches):
            inputs = tokenize(tokenizer, batch, max_length, device)
            with torch.no_grad():
                outputs = model(**inputs, output_hidden_states=True)
                m = captured.pop("M").reshape(-1, dim).to(torch.float64)
                h_start = outputs.hidden_states[start].reshape(-1, dim).to(torch.float64)
                h_end = outputs.hidden_states[end].reshape(-1, dim).to(torch.float64)  # post-norm if end == L
                target = h_end + m - h_start  # h_end - Y, in the reference's order
                A += m.T @ m
                B += m.T @ target
                target_sq += (target * target).sum()
                end_sq += (h_end * h_end).sum()
                rows += m.shape[0]
                real_tokens += int(inputs["attention_mask"].sum())
            del outputs, m, h_start, h_end, target
            print(f"\rstatistics: batch {i + 1}/{len(batches)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        hook.remove()
    return A, B, float(target_sq), float(end_sq), rows, real_tokens


def solve(A: torch.Tensor, B: torch.Tensor, alpha: float, solver: str) -> torch.Tensor:
    regularised = A + alpha * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    if solver == "inv":
        return torch.linalg.inv(regularised) @ B
    return torch.linalg.solve(regularised, B)


def merge(model_src: str, T: torch.Tensor, start: int, end: int, dtype: torch.dtype):
    """The reference's merge: fresh CPU model, delete layers start..end-1, W' = T^T W in float64, cast."""
    model = load_model(model_src, dtype, torch.device("cpu"))
    model.config.num_hidden_layers -= end - start
    model.model.layers = torch.nn.ModuleList(
        [layer for idx, layer in enumerate(model.model.layers) if idx < start or idx >= end])
    down = model.model.layers[start - 1].mlp.down_proj
    state = {"weight": (T.T.cpu() @ down.weight.to(torch.float64)).to(dtype)}
    if down.bias is not None:  # the reference loads only "weight" (it would fail here); b' = b T keeps M T exact
        state["bias"] = (down.bias.to(torch.float64) @ T.cpu()).to(dtype)
    down.load_state_dict(state)
    return model


def residual_sq(A, B, T, target_sq) -> float:
    return float((T * (A @ T)).sum() - 2.0 * (T * B).sum() + target_sq)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory or a .gguf file")
    parser.add_argument("--data", required=True, help=".jsonl file (or .txt, one text a line)")
    parser.add_argument("--column", default="text")
    parser.add_argument("--size", type=int, default=256, help="first N rows (the reference's dataset_size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--layers-to-skip", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype of both passes")
    parser.add_argument("--alpha", type=float, default=0.0, help="ridge term (the reference's alpha)")
    parser.add_argument("--solver", default="solve", choices=["solve", "inv"],
                        help="torch.linalg.solve, or the reference's explicit inverse")
    parser.add_argument("--merge-dtype", default="bfloat16", choices=list(DTYPES),
                        help="dtype of the fresh CPU model the T is merged into (the reference: bfloat16)")
    parser.add_argument("--no-merge", action="store_true", help="skip the merge step")
    parser.add_argument("--save-model", default=None, help="save_pretrained the merged model here (timed)")
    parser.add_argument("--save-transform", default=None, help="write T (key 'T', float64) to this .safetensors")
    parser.add_argument("--output", default=None, help="write the JSON summary here too")
    parser.add_argument("--no-reference-gc", action="store_true",
                        help="skip the reference's gc.collect()/empty_cache() after every distance batch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch has no CUDA device here")
    dtype = DTYPES[args.dtype]
    n = args.layers_to_skip
    steps = Steps(device)
    wall_start = time.perf_counter()

    with steps("load"):
        model = load_model(args.model, dtype, device)
        tokenizer = load_tokenizer(args.model)
    num_layers = model.config.num_hidden_layers
    if not 1 <= n < num_layers:
        parser.error(f"--layers-to-skip {n} must be in 1..{num_layers - 1}")
    with steps("data"):
        texts = load_texts(args.data, args.column, args.size)
        batches = batches_of(texts, args.batch_size)
    if not batches:
        parser.error(f"{len(texts)} texts make no full batch of {args.batch_size}")

    with steps("pass1_distances"):
        distances = distance_pass(model, tokenizer, batches, args.max_length, n, device,
                                  collect=not args.no_reference_gc)
    candidates = {l: d for l, d in distances.items() if l >= 1}
    start = min(candidates, key=lambda l: (candidates[l], l))
    end = start + n
    min_all = min(distances, key=lambda l: (distances[l], l))
    print(f"block ({start}, {end}) at distance {distances[start]:.4f}", file=sys.stderr)

    with steps("pass2_statistics"):
        A, B, target_sq, end_sq, rows, real_tokens = statistics_pass(model, tokenizer, batches, args.max_length,
                                                                     start, end, device)
    with steps("solve"):
        T = solve(A, B, args.alpha, args.solver)
    A_cpu, B_cpu, T_cpu = A.cpu(), B.cpu(), T.cpu()
    eig = torch.linalg.eigvalsh(A_cpu)
    identity = torch.eye(T_cpu.shape[0], dtype=torch.float64)
    error_with_T = residual_sq(A_cpu, B_cpu, T_cpu, target_sq) / end_sq
    error_without_T = residual_sq(A_cpu, B_cpu, identity, target_sq) / end_sq
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    merged_info = None
    if not args.no_merge:
        with steps("merge"):
            merged = merge(args.model, T_cpu, start, end, DTYPES[args.merge_dtype])
        w = merged.model.layers[start - 1].mlp.down_proj.weight
        merged_info = {"dtype": args.merge_dtype, "layers": merged.config.num_hidden_layers,
                       "max_abs_down_proj": float(w.float().abs().max())}
        if args.save_model:
            with steps("save_model"):
                merged.save_pretrained(args.save_model)
                load_tokenizer(args.model).save_pretrained(args.save_model)
        del merged

    if args.save_transform:
        from safetensors.torch import save_file

        Path(args.save_transform).parent.mkdir(parents=True, exist_ok=True)
        save_file({"T": T_cpu.contiguous()}, args.save_transform,
                  metadata={"block": f"{start},{end}", "solver": args.solver, "alpha": str(args.alpha)})

    summary = {
        "tool": "reference ReplaceMe lstsq pipeline (PyTorch re-implementation, bench/reference_pipeline_torch.py)",
        "model": args.model,
        "num_hidden_layers": num_layers,
        "hidden_size": int(T_cpu.shape[0]),
        "layers_to_skip": n,
        "block": [start, end],
        "block_distance": distances[start],
        "distances": {str(l): d for l, d in distances.items()},  # start l: d(h_l, h_{l+n}), l = 0..L-n
        "min_over_starts_ge_1": {"start": start, "distance": distances[start]},
        "min_over_all_starts": {"start": min_all, "distance": distances[min_all]},
        "end_is_last_layer_post_norm_target": end == num_layers,
        "calibration": {"texts": len(texts), "batches": len(batches), "sequences": len(batches) * args.batch_size,
                        "real_tokens": real_tokens, "fit_rows": rows, "pad_fraction": 1 - real_tokens / rows,
                        "padding_side": tokenizer.padding_side, "pad_token_id": tokenizer.pad_token_id},
        "solver": {"method": args.solver, "alpha": args.alpha,
                   "condition_number": float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf,
                   "relative_error_with_T": error_with_T, "relative_error_without_T": error_without_T,
                   "max_abs_T": float(T_cpu.abs().max()), "frobenius_T": float(torch.linalg.norm(T_cpu))},
        "merge": merged_info,
        "wall_time_s": steps.seconds,
        "total_wall_time_s": round(time.perf_counter() - wall_start, 3),
        "peak_rss_mb_after_step": steps.peak_rss_mb,
        "peak_cuda_allocated_mb_in_step": steps.peak_cuda_mb or None,
        "settings": {k: v for k, v in vars(args).items()},
        "platform": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version(), "device": str(device),
                     "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     "threads": torch.get_num_threads()},
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
