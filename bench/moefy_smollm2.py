"""Build a real mixture-of-experts test subject from SmolLM2-135M ("MoEfication"), with no training.

    .venv/bin/python bench/moefy_smollm2.py --out /tmp/smollm2-moe
    (defaults: --experts 16 --top-k 4 --shared-fraction 0.5 --correct; see BENCHMARKS.md for others)

No trained MoE checkpoint can be downloaded here, so the dense model's MLPs are split into experts:

1. Calibration text (C4 sample, ``--sequences`` x ``--max-length`` tokens) runs through the model
   layer by layer. Layer ``l`` sees the residual stream of the MoE model built so far (layers
   ``< l`` already converted), so each router is fitted to the inputs it will really get.
2. With ``--shared-fraction f`` the fraction ``f`` of neurons (intermediate channels of gate/up/down)
   with the most output energy (mean ``a_j^2 * ||W_down[j]||^2``) become an always-on shared expert
   (a ``qwen2_moe`` model; its sigmoid gate has a zero kernel, so 1/2, and its down_proj is doubled).
   The other neurons are clustered into ``E`` equal groups by co-activation: each neuron is the
   vector of its absolute activations on a token sample (unit norm); balanced k-means assigns
   neurons to centroids with a linear assignment (every expert gets exactly the same width). The
   shared expert plus all routed experts is the dense MLP exactly. Without a shared expert the
   model is a ``mixtral``.
3. The router ``W_r [D, E]`` is initialised in closed form: least squares from the MLP input to the
   per-token centred log-norm of each expert's output (larger contribution, higher logit), then
   the logits' scale is picked from a few values by the loss below (scaling keeps the ranking and
   sets how even the gates are). ``--steps N`` then runs optax Adam on ``W_r`` and one output scale
   per expert (folded into ``down_proj``) against the dense MLP output under the real routing
   (softmax, top-k, renormalise); the loss mixes the per-token and the total relative error (see
   ``fit_router``: SmolLM2's massive activations need the second). Default 0 steps: on layers 1, 3
   and 11 (16 experts, top-4/6) Adam through the gates never beat the scaled closed form within 300
   steps (lr 1e-3 to 1e-2), as the gates' gradient ignores which experts top-k picks.
4. ``--correct`` folds one least-squares map per layer (MoE output -> dense MLP output, ReplaceMe's
   closed form) into every expert's down_proj: it recovers the part of the dropped experts'
   output that the kept ones predict (WikiText-2 ppl 157 -> 94 for 16 experts top-8).
5. The result is written as a Hugging Face directory, its logits are compared with transformers',
   and ``moefy_report.json`` records per-layer relative errors (fitted router vs the oracle that
   picks the k largest experts), a quick WikiText-2 perplexity against the dense model, and timings.

The MoE model's quality against the dense one is measured by ``bench/moe_smollm2.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replaceme_jax.conversion import LoadedModel, export_hf, load_model, load_tokenizer  # noqa: E402
from replaceme_jax import evaluation as ev  # noqa: E402
from replaceme_jax.data import load_calibration, make_batches, pad_token_id  # noqa: E402
from replaceme_jax.models import llama, moe  # noqa: E402
from replaceme_jax.models.common import rms_norm  # noqa: E402

log = logging.getLogger("moefy")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "c4_sample.jsonl"


_DENSE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id",
               "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_dropout", "head_dim")


def mixtral_hf_config(dense: dict, experts: int, top_k: int) -> dict:
    cfg = {k: dense[k] for k in _DENSE_KEYS if k in dense}
    cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
               intermediate_size=dense["intermediate_size"] // experts, num_local_experts=experts,
               num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0,
               output_router_logits=False, router_aux_loss_coef=0.0)
    return cfg


def qwen2_moe_hf_config(dense: dict, experts: int, top_k: int, expert_size: int, shared_size: int) -> dict:
    cfg = {k: dense[k] for k in _DENSE_KEYS if k in dense}
    cfg.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=experts,
               num_experts_per_tok=top_k, moe_intermediate_size=expert_size, shared_expert_intermediate_size=shared_size,
               norm_topk_prob=True, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
               output_router_logits=False, router_aux_loss_coef=0.0)
    return cfg


@functools.partial(jax.jit, static_argnames=("config",))
def _attention_half(layer, h, mask, config):
    ctx = llama.attention_context(config, mask.shape, mask)
    y = h + llama._attention(layer["self_attn"], config, rms_norm(h, layer["input_layernorm"]["scale"],
                                                                   config.rms_norm_eps), ctx, None)
    return y, rms_norm(y, layer["post_attention_layernorm"]["scale"], config.rms_norm_eps)


@jax.jit
def _neuron_activations(mlp, x):
    return jax.nn.silu(x @ mlp["gate_proj"]["kernel"]) * (x @ mlp["up_proj"]["kernel"])


def balanced_kmeans(features: np.ndarray, clusters: int, seed: int, iterations: int = 20) -> np.ndarray:
    """Cluster id of each row of ``features [I, T]`` (unit rows), every cluster of exactly I/clusters rows."""
    n = features.shape[0]
    size = n // clusters
    rng = np.random.default_rng(seed)
    centroids = features[rng.choice(n, clusters, replace=False)]
    labels = np.full(n, -1)
    for _ in range(iterations):
        similarity = features @ centroids.T  # [I, E]
        rows, cols = linear_sum_assignment(-np.repeat(similarity, size, axis=1))
        new_labels = np.empty(n, np.int64)
        new_labels[rows] = cols // size
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centroids = np.stack([features[labels == e].mean(0) for e in range(clusters)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
    return labels


def _moe_output(router, log_scale, outputs, x, top_k):
    # Mixtral routing: softmax over all experts, top-k, renormalise over the k.
    probs = jax.nn.softmax(x @ router, axis=-1)
    gates, experts = jax.lax.top_k(probs, top_k)
    gates = gates / gates.sum(-1, keepdims=True) * jnp.exp(log_scale)[experts]
    picked = jnp.take_along_axis(outputs, experts.T[:, :, None], axis=0)  # [k, T, D]
    return jnp.einsum("tk,ktd->td", gates, picked)


def relative_error(pred, target) -> float:
    return float(jnp.mean(jnp.sum((pred - target) ** 2, -1)) / jnp.mean(jnp.sum(target**2, -1)))


def fit_router(x: jax.Array, outputs: jax.Array, top_k: int, steps: int, batch: int, lr: float, seed: int,
               base: jax.Array | None = None):
    """Router ``[D, E]`` and per-expert log output scales for the MoE layer on tokens ``x``.

    The loss is the per-token relative error ``||y_moe - y||^2 / ||y||^2`` on batches drawn half
    uniformly and half in proportion to ``||y||^2``: so the mean is an even mix of the per-token
    error and the total relative error. The second half matters: a few tokens (position 0, SmolLM2's
    massive activations) carry most of an MLP's output energy, come from one expert, and are about one
    in 300 tokens; uniform batches rarely see them and a router that misroutes them breaks the model.
    ``base`` (the shared expert's output, if any) adds to the routed sum in the dense output the
    errors are relative to.
    """
    target = outputs.sum(0)
    num_experts = outputs.shape[0]
    log_norm = jnp.log(jnp.linalg.norm(outputs, axis=-1).T + 1e-6)  # [T, E]
    log_norm = log_norm - log_norm.mean(-1, keepdims=True)
    x64, t64 = np.asarray(x, np.float64), np.asarray(log_norm, np.float64)
    ridge = 1e-3 * np.trace(x64.T @ x64) / x64.shape[1]
    router = np.linalg.solve(x64.T @ x64 + ridge * np.eye(x64.shape[1]), x64.T @ t64).astype(np.float32)
    energy = jnp.sum((target if base is None else target + base) ** 2, -1)
    optimizer = optax.adam(lr)

    def per_token(p, outs, xs, target_xs, energy_xs):
        pred = _moe_output(p["router"], p["log_scale"], outs, xs, top_k)
        return jnp.sum((pred - target_xs) ** 2, -1) / (energy_xs + 1e-12)

    def loss_fn(p, idx):
        return jnp.mean(per_token(p, outputs[:, idx], x[idx], target[idx], energy[idx]))

    @jax.jit
    def step(p, state, idx):
        loss, grads = jax.value_and_grad(loss_fn)(p, idx)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    @jax.jit
    def full_loss(p, outputs, x, target, energy):  # the same mixture, exactly
        err = per_token(p, outputs, x, target, energy) * energy
        return 0.5 * jnp.mean(err / (energy + 1e-12)) + 0.5 * jnp.sum(err) / jnp.sum(energy)

    # Scaling the logits keeps the ranking (which experts run) and sets how uneven the gates are: tiny
    # logits give each chosen expert 1/k, which the scale k undoes (the sum of the chosen experts).
    log_scale = jnp.full((num_experts,), np.log(top_k), jnp.float32)
    candidates = [{"router": jnp.asarray(router * t), "log_scale": log_scale} for t in (0.01, 0.1, 0.3, 1.0)]
    losses = [float(full_loss(c, outputs, x, target, energy)) for c in candidates]
    params = candidates[int(np.argmin(losses))]
    closed_form, initial = params, min(losses)
    if steps == 0:
        return (params, initial), initial
    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    weights = np.asarray(energy, np.float64)
    weights /= weights.sum()
    half = min(batch, n) // 2
    for _ in range(steps):
        idx = np.concatenate([rng.choice(n, half, replace=False), rng.choice(n, half, p=weights)])
        params, state, _ = step(params, state, jnp.asarray(idx))
    final = float(full_loss(params, outputs, x, target, energy))
    # The gates' gradient ignores which experts top-k picks; keep the closed form where Adam did not help.
    return (params, final) if final < initial else (closed_form, initial), initial


def mean_token_error(pred, target) -> float:
    return float(jnp.mean(jnp.sum((pred - target) ** 2, -1) / (jnp.sum(target**2, -1) + 1e-12)))


def check_with_transformers(directory: str, model: LoadedModel, batches) -> float:
    """Max |logit difference| between transformers on the exported directory and our forward (2 rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    batch = next(iter(batches))
    ids, mask = batch.input_ids[:2, :128], batch.attention_mask[:2, :128]
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(moe.forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)).logits)
    difference = float(np.abs(ours - theirs)[mask.astype(bool)].max())
    log.info("exported model vs transformers: max |logit difference| %.2e", difference)
    return difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--correct", action=argparse.BooleanOptionalAction, default=True,
                        help="fold a per-layer least-squares map (MoE output -> dense output) into the experts")
    parser.add_argument("--shared-fraction", type=float, default=0.5,
                        help="fraction of neurons (highest output energy) in an always-on shared expert; > 0 "
                             "writes a qwen2_moe model (shared expert, gate fixed at 1/2), else mixtral")
    parser.add_argument("--dataset", default=str(DEFAULT_DATA))
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cluster-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--fit-batch", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-windows", type=int, default=8, help="WikiText-2 windows for a quick ppl check")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()

    dense = load_model(args.model)
    c = dense.config
    tokenizer = load_tokenizer(dense)
    sequences = load_calibration(args.dataset, tokenizer, args.max_length, size=args.sequences)
    batches = make_batches(sequences, args.batch_size, args.max_length, pad_token_id(tokenizer))
    log.info("calibration: %d sequences, %d tokens", batches.num_sequences, batches.num_tokens)

    shared_size = int(round(c.intermediate_size * args.shared_fraction))
    routed_size = c.intermediate_size - shared_size
    if routed_size % args.experts:
        raise SystemExit(f"{routed_size} routed neurons are not divisible by {args.experts} experts")
    hf_config = (mixtral_hf_config(dense.hf_config, args.experts, args.top_k) if not shared_size else
                 qwen2_moe_hf_config(dense.hf_config, args.experts, args.top_k, routed_size // args.experts,
                                     shared_size))
    moe_config = moe.config_from_hf(hf_config)
    masks = [jnp.asarray(b.attention_mask) for b in batches]
    hidden = [llama.embed(dense.params, jnp.asarray(b.input_ids)) for b in batches]
    valid = [np.asarray(m).reshape(-1).astype(bool) for m in masks]
    total = int(sum(v.sum() for v in valid))
    rng = np.random.default_rng(args.seed)
    held_out = np.zeros(total, bool)
    held_out[rng.choice(total, total // 8, replace=False)] = True  # errors are reported on these tokens

    layers, report_layers = [], []
    size = routed_size // args.experts
    for index, layer in enumerate(tqdm(dense.params["layers"], desc="moefy layers", unit="layer")):
        t0 = time.perf_counter()
        ys, xs = zip(*(_attention_half(layer, h, m, c) for h, m in zip(hidden, masks)))
        x = jnp.concatenate([xb.reshape(-1, c.hidden_size)[v] for xb, v in zip(xs, valid)])  # real tokens
        acts = _neuron_activations(layer["mlp"], x)  # [T, I]
        down = layer["mlp"]["down_proj"]["kernel"]
        # the shared expert takes the neurons with the most output energy; the rest are routed
        energy = np.asarray(jnp.mean(acts**2, 0)) * np.asarray(jnp.sum(down**2, 1))
        shared = np.sort(np.argsort(-energy, kind="stable")[:shared_size])
        routed = np.setdiff1d(np.arange(c.intermediate_size), shared)
        sample = rng.choice(total, min(args.cluster_tokens, total), replace=False)
        features = np.abs(np.asarray(acts[sample][:, routed])).T
        features /= np.linalg.norm(features, axis=1, keepdims=True) + 1e-12
        labels = balanced_kmeans(features, args.experts, args.seed + index)
        groups = [routed[labels == e] for e in range(args.experts)]
        outputs = jnp.stack([acts[:, g] @ down[g] for g in groups])  # [E, T, D]
        base = acts[:, shared] @ down[shared] if shared_size else jnp.zeros_like(x)
        train = jnp.asarray(np.flatnonzero(~held_out))
        test = jnp.asarray(np.flatnonzero(held_out))
        (fitted, train_loss), initial_loss = fit_router(x[train], outputs[:, train], args.top_k, args.steps,
                                                        args.fit_batch, args.lr, args.seed + index, base=base[train])
        target = outputs[:, test].sum(0) + base[test]
        fitted_out = base[test] + _moe_output(fitted["router"], fitted["log_scale"], outputs[:, test], x[test],
                                              args.top_k)
        err_fit = relative_error(fitted_out, target)
        correction = None
        if args.correct:
            # ReplaceMe's trick per layer: one least-squares map T from the MoE output to the dense one
            # (train tokens), folded into every expert's down_proj (and the shared expert's).
            moe_train = np.asarray(base[train] + _moe_output(fitted["router"], fitted["log_scale"], outputs[:, train],
                                                             x[train], args.top_k), np.float64)
            dense_train = np.asarray(outputs[:, train].sum(0) + base[train], np.float64)
            gram = moe_train.T @ moe_train
            ridge = 1e-4 * np.trace(gram) / gram.shape[0]
            correction = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), moe_train.T @ dense_train)
            fitted_out = jnp.asarray(np.asarray(fitted_out, np.float64) @ correction, jnp.float32)
            err_fit = relative_error(fitted_out, target)
        norms = jnp.linalg.norm(outputs[:, test], axis=-1)  # [E, T]
        top = jnp.argsort(-norms, axis=0)[: args.top_k]
        oracle = base[test] + jnp.take_along_axis(outputs[:, test], top[:, :, None], axis=0).sum(0)
        err_oracle = relative_error(oracle, target)
        token_fit = mean_token_error(fitted_out, target)
        token_oracle = mean_token_error(oracle, target)

        scale = np.exp(np.asarray(fitted["log_scale"]))
        fold = (lambda w: w) if correction is None else (
            lambda w: jnp.asarray(np.asarray(w, np.float64) @ correction, jnp.float32))
        mlp = {
            "gate": {"kernel": fitted["router"].astype(jnp.float32)},
            "experts": {
                "gate_proj": {"kernel": jnp.stack([layer["mlp"]["gate_proj"]["kernel"][:, g] for g in groups])},
                "up_proj": {"kernel": jnp.stack([layer["mlp"]["up_proj"]["kernel"][:, g] for g in groups])},
                "down_proj": {"kernel": jnp.stack([fold(down[g] * s) for g, s in zip(groups, scale)])},
            },
        }
        if shared_size:
            mlp["shared_expert"] = {
                "gate_proj": {"kernel": layer["mlp"]["gate_proj"]["kernel"][:, shared]},
                "up_proj": {"kernel": layer["mlp"]["up_proj"]["kernel"][:, shared]},
                # a zero gate kernel makes the shared expert's sigmoid gate 1/2 on every token
                "down_proj": {"kernel": fold(down[shared] * 2.0)},
            }
            mlp["shared_expert_gate"] = {"kernel": jnp.zeros((c.hidden_size, 1), jnp.float32)}
        new_layer = {k: v for k, v in layer.items() if k != "mlp"} | {"mlp": mlp}
        layers.append(new_layer)
        hidden = [y + moe.moe_block(mlp, moe_config, xb)[0] for y, xb in zip(ys, xs)]
        report_layers.append({"layer": index, "relative_error_fitted": err_fit, "relative_error_oracle_topk": err_oracle,
                              "token_error_fitted": token_fit, "token_error_oracle_topk": token_oracle,
                              "train_loss_closed_form": initial_loss, "train_loss": train_loss, "expert_scales": scale.tolist(),
                              "seconds": time.perf_counter() - t0})
        log.info("layer %d: held-out relative error %.4f, per token %.4f (oracle top-%d %.4f, %.4f); "
                 "train loss %.4f -> %.4f", index, err_fit, token_fit, args.top_k, err_oracle, token_oracle,
                 initial_loss, train_loss)
        del acts, outputs

    params = {k: v for k, v in dense.params.items() if k != "layers"} | {"layers": layers}
    quick = {}
    if args.check_windows:
        # A quick look only; bench/moe_smollm2.py evaluates the full task set.
        task = ev.load_task("wikitext2", limit=args.check_windows)
        for name, (p, cfg) in {"dense": (dense.params, c), "moe": (params, moe_config)}.items():
            quick[name] = ev.run_task(p, cfg, tokenizer, task, max_length=1024, batch_size=4).metrics["perplexity"]
        log.info("WikiText-2 perplexity, first %d windows: dense %.2f, MoE %.2f", args.check_windows, quick["dense"],
                 quick["moe"])
    model = LoadedModel(config=moe_config, params=params, hf_config=hf_config, source=dense.source,
                        source_format="hf", dtype="float32", source_dtype="float32",
                        tokenizer_source=dense.tokenizer_source)
    report = {
        "source": dense.source, "model_type": moe_config.model_type, "experts": args.experts, "top_k": args.top_k,
        "shared_expert_size": shared_size, "least_squares_correction": args.correct,
        "expert_intermediate_size": size, "calibration": {"dataset": args.dataset, "sequences": batches.num_sequences,
                                                         "tokens": total, "held_out_tokens": int(held_out.sum())},
        "fit": {"steps": args.steps, "batch": args.fit_batch, "lr": args.lr},
        "mean_relative_error_fitted": float(np.mean([r["relative_error_fitted"] for r in report_layers])),
        "mean_relative_error_oracle_topk": float(np.mean([r["relative_error_oracle_topk"] for r in report_layers])),
        "mean_token_error_fitted": float(np.mean([r["token_error_fitted"] for r in report_layers])),
        "mean_token_error_oracle_topk": float(np.mean([r["token_error_oracle_topk"] for r in report_layers])),
        "wikitext2_perplexity_quick": quick | {"windows": args.check_windows},
        "layers": report_layers, "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "date": time.strftime("%Y-%m-%d"),
    }

    def write_report(tmp: Path) -> None:
        (tmp / "moefy_report.json").write_text(json.dumps(report, indent=1))

    export_hf(model, args.out, overwrite=args.overwrite, write_extra=write_report)
    report["transformers_max_abs_logit_difference"] = check_with_transformers(args.out, model, batches)
    Path(args.out, "moefy_report.json").write_text(json.dumps(report, indent=1))
    log.info("wrote %s in %.0f s; mean relative MLP error %.4f (oracle top-%d %.4f)", args.out,
             report["seconds"], report["mean_relative_error_fitted"], args.top_k,
             report["mean_relative_error_oracle_topk"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
