"""ReplaceMe through Gemma's post-MLP norm: which way of writing the linear map back into a plain Gemma
layer works best (issue 13). Prints one JSON object; BENCHMARKS.md ("Gemma 2 / Gemma 3") has the table.

    .venv/bin/python bench/gemma_fold.py [--model gemma3-270m] [--docs 96] [--heldout 16] [--max-length 256]
                                          [--n 3] [--start S] [--first exclude|include] [--out result.json]
                                          [--tasks wikitext2,arc_easy,... --limit SPEC [--eval-options a,b,...]]

In a Gemma layer the MLP output z goes through ``post_feedforward_layernorm`` before the residual add:
``M = g * RMSNorm(z)`` with ``g = 1 + w``, so ``M T`` for a full D x D map T cannot be folded into
``down_proj``. The options, each fitted on the same calibration rows of layer ``start - 1`` (z, M, the
attention residual Y, the block output h_end; target ``h_end - Y``), and each scored on held-out documents
by the relative error of ``h_start`` against ``h_end`` and by the perplexity of the exported model:

- ``explicit``: the full least-squares T applied as an extra matrix (not a plain Gemma; the bound).
- ``diag_of_full`` (a): the full T's diagonal folded into the post-norm's scale.
- ``diag`` (a): a diagonal T fitted on its own, folded into the post-norm's scale (exact).
- ``prenorm_lstsq`` (b): T folded into ``down_proj``, fitted in closed form to the target direction in
  front of the norm (rows ``(h_end - Y) / g`` rescaled to the rms of z: RMSNorm is scale-invariant per row).
- ``prenorm_lstsq_rescaled`` (b): the same, then the post-norm's scale refitted per channel.
- ``prenorm_cosine`` (b): the same T refined by Adam on the cosine objective, then the scale refitted.
- ``next_input_cosine`` (c): T and scale by Adam so that the next layer's (normalised) input direction
  ``Y + branch`` matches ``h_end`` (cosine).
- ``orthogonal_scaled`` (d): the maps that fold exactly, ``T = diag(g)^-1 Q diag(s)`` with Q orthogonal
  (RMSNorm(z Q) = RMSNorm(z) Q, so Q goes into ``down_proj`` and s into the norm), fitted on the Gram
  matrices by a majorise-minimise iteration (each step a polar decomposition).
- ``direct_mse`` (d): T and scale by Adam on the true folded branch ``s * RMSNorm(z T)`` against the target
  (least squares), from the best closed-form start.

With ``--tasks`` (and ``--limit``, as ``replaceme-jax evaluate``'s) the options named by ``--eval-options``
(default: all, with ``original`` and ``uidl``) are also scored in this process by the project's evaluator:
``load_task`` / ``run_task``, the functions ``replaceme-jax evaluate`` runs, on the same items for every
option. Every option but ``explicit`` is a plain Gemma (the pruned params with one layer rewritten);
``explicit`` is scored as the pruned params plus its T, through ``explicit_map_forward`` (the library's
Gemma layer, with ``M T`` in place of ``M`` in the one layer that carries T). Nothing is written to disk
but ``--out`` (kept up to date after each evaluated option).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.evaluation import load_task, parse_limits, parse_task_list, run_task
from replaceme_jax.models import family_for, gemma
from replaceme_jax.models.gemma import gemma_rms_norm, mlp_pre_norm
from replaceme_jax.replaceme.merge import replace_block

HIGHEST = jax.lax.Precision.HIGHEST


def documents(tokenizer, count: int, max_length: int, path: str) -> list[np.ndarray]:
    out = []
    with open(path) as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"])["input_ids"][:max_length]  # BOS added by the tokenizer
            if len(ids) >= 16:
                out.append(np.asarray(ids, np.int32))
            if len(out) == count:
                break
    return out


def batches(docs, size: int, width: int):
    for i in range(0, len(docs), size):
        chunk = docs[i:i + size]
        ids = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width), np.int32)
        for r, d in enumerate(chunk):
            ids[r, :len(d)], mask[r, :len(d)] = d, 1
        yield ids, mask


def rows_of(params, config, docs, start, end, width):
    """Per real token: z (MLP output before its post-norm) of layer start-1, Y, h_end, and position."""
    family = family_for(config.model_type)

    @jax.jit
    def run(ids, mask):
        ctx = family.attention_context(config, ids.shape, mask)
        h = family.embed(params, ids)
        for i in range(end):
            layer = params["layers"][i]
            if i == start - 1:
                out = {}
                attn = family.decoder_layer  # Y from the layer; z recomputed from Y
                h_next, y, m = attn(layer, config, i, h, ctx)
                normed = gemma_rms_norm(y, layer["pre_feedforward_layernorm"]["scale"], config.rms_norm_eps)
                out.update(z=mlp_pre_norm(layer["mlp"], normed), y=y, m=m)
                h = h_next
            else:
                h, _, _ = family.decoder_layer(layer, config, i, h, ctx)
        out["h_end"] = h
        return out

    acc = {k: [] for k in ("z", "y", "m", "h_end", "pos")}
    with jax.default_matmul_precision("highest"):
        for ids, mask in batches(docs, 8, width):
            out = jax.device_get(run(ids, mask))
            keep = mask.astype(bool)
            for k in ("z", "y", "m", "h_end"):
                acc[k].append(np.asarray(out[k])[keep])
            acc["pos"].append(np.broadcast_to(np.arange(width), ids.shape)[keep])
    return {k: np.concatenate(v) for k, v in acc.items()}


def distances(params, config, docs, n, width):
    family = family_for(config.model_type)

    @jax.jit
    def hidden(ids, mask):
        return family.forward(params, config, ids, mask, collect_layers=True, compute_logits=False).hidden_states

    total = np.zeros(config.num_hidden_layers - n + 1)
    count = 0
    with jax.default_matmul_precision("highest"):
        for ids, mask in batches(docs, 8, width):
            hs = [np.asarray(h, np.float64) for h in hidden(ids, mask)]
            last = mask.sum(-1) - 1
            rows = np.arange(len(ids))
            for s in range(1, config.num_hidden_layers - n + 1):
                a, b = hs[s][rows, last], hs[s + n][rows, last]
                cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                total[s] += np.sum(np.arccos(np.clip(cos, -1, 1)) / np.pi)
            count += len(ids)
    return {s: float(total[s] / count) for s in range(1, config.num_hidden_layers - n + 1)}


def rms_normed(z, eps):
    z = z.astype(np.float64)
    return z / np.sqrt(np.mean(z * z, -1, keepdims=True) + eps)


def polar(a):
    u, _, vt = np.linalg.svd(a)
    return u @ vt


def _retract(x):
    q, r = np.linalg.qr(x)
    return q * np.sign(np.diag(r))[None, :]


def fit_orthogonal_scaled(A, B, T0, iters=400):
    """min over orthogonal Q and diagonal s of ``tr(S Q^T A Q S) - 2 tr(S Q^T B)`` (i.e. ||R Q S - target||^2
    up to a constant); s in closed form for each Q, Q by Riemannian gradient descent with Barzilai-Borwein
    steps and a QR retraction, from the better of polar(B) and polar(T0)."""
    def evaluate(Q):
        AQ = A @ Q
        den = np.einsum("ij,ij->j", Q, AQ)
        num = np.einsum("ij,ij->j", Q, B)
        s = num / den
        grad = 2 * (AQ * s**2 - B * s)
        sym = Q.T @ grad
        return -np.sum(num**2 / den), s, grad - Q @ (0.5 * (sym + sym.T))

    Q = min((polar(B), polar(T0)), key=lambda q: evaluate(q)[0])
    f, s, xi = evaluate(Q)
    start = f
    eta = 1.0 / (2 * np.linalg.eigvalsh(A)[-1] * np.max(s**2))
    for it in range(iters):
        Qn = _retract(Q - eta * xi)
        fn, sn, xin = evaluate(Qn)
        if fn > f:
            eta *= 0.5
            continue
        dQ, dxi = Qn - Q, xin - xi
        eta = abs(np.sum(dQ * dQ) / np.sum(dQ * dxi)) if np.sum(dQ * dxi) != 0 else eta
        Q, f, s, xi = Qn, fn, sn, xin
    return Q, s, {"objective_start": float(start), "objective_end": float(f), "iterations": iters}


def project_orthogonal_scaled(T_R, iters=30):
    """The nearest ``Q diag(s)`` to ``T_R`` in the Frobenius norm (no data): alternate s and polar."""
    Q = polar(T_R)
    for _ in range(iters):
        s = np.einsum("ij,ij->j", Q, T_R)
        Q = polar(T_R * s[None, :])
    return Q, np.einsum("ij,ij->j", Q, T_R)


# ------------------------------------------------------------------------------------------------
# Fits. Each returns (name, fold) where fold is ("explicit", T) or ("layer", down_map, scale): the layer
# gets down_proj @ down_map (None: unchanged) and post-norm scale ``scale`` (g' = 1 + w').


def fit_all(fit, g, eps, ridge_rel, adam_epochs, seed=0):
    z, m, y, h_end = (fit[k].astype(np.float64) for k in ("z", "m", "y", "h_end"))
    w = fit["w"]
    target = h_end - y
    d = z.shape[1]
    out = {}

    def ridge(a):
        return ridge_rel * np.mean(np.diag(a))

    A = (m * w[:, None]).T @ m
    B = (m * w[:, None]).T @ target
    T_full = np.linalg.solve(A + ridge(A) * np.eye(d), B)
    out["explicit"] = ("explicit", T_full)
    out["diag_of_full"] = ("layer", None, g * np.diag(T_full))
    t_diag = np.sum(w[:, None] * m * target, 0) / np.sum(w[:, None] * m * m, 0)
    out["diag"] = ("layer", None, g * t_diag)

    # (b) closed form in front of the norm
    r_target = target / g
    scale = np.sqrt(np.mean(z * z, -1, keepdims=True)) / np.maximum(
        np.sqrt(np.mean(r_target * r_target, -1, keepdims=True)), 1e-12)
    Z = r_target * scale
    Az = (z * w[:, None]).T @ z
    T_pre = np.linalg.solve(Az + ridge(Az) * np.eye(d), (z * w[:, None]).T @ Z)
    out["prenorm_lstsq"] = ("layer", T_pre, g)

    def refit_scale(T):
        r = rms_normed(z @ T, eps)
        return np.sum(w[:, None] * r * target, 0) / np.sum(w[:, None] * r * r, 0)

    out["prenorm_lstsq_rescaled"] = ("layer", T_pre, refit_scale(T_pre))

    # (d) orthogonal-scaled maps: R Q diag(s) ~ target, fitted on the Gram matrices
    R = rms_normed(z, eps)
    A_R = (R * w[:, None]).T @ R
    B_R = (R * w[:, None]).T @ target
    t1 = time.time()
    Q, s, info = fit_orthogonal_scaled(A_R, B_R, T_full * g[:, None])
    out["orthogonal_scaled"] = ("layer", Q, s)
    print("orthogonal_scaled", info, f"{time.time() - t1:.0f}s", flush=True)
    Qp, sp = project_orthogonal_scaled(T_full * g[:, None])
    out["orthogonal_projected"] = ("layer", Qp, sp)

    # Adam fits on rows (float32), T and the scale jointly
    zj, yj, hj, tj, wj = (jnp.asarray(a, jnp.float32) for a in (z, y, h_end, target, w))
    rtj = jnp.asarray(r_target, jnp.float32)

    def normed(zb, T):
        v = zb @ T
        return v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + eps)

    def cos(a, b):
        return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)

    losses = {
        "prenorm_cosine": lambda p, zb, yb, hb, tb, rb: 1 - cos(zb @ p["T"], rb),
        "next_input_cosine": lambda p, zb, yb, hb, tb, rb: 1 - cos(yb + normed(zb, p["T"]) * p["s"], hb),
        "direct_mse": lambda p, zb, yb, hb, tb, rb: jnp.sum((normed(zb, p["T"]) * p["s"] - tb) ** 2, -1),
    }
    starts = {"prenorm_cosine": (T_pre, refit_scale(T_pre)), "next_input_cosine": None, "direct_mse": None}
    for name, loss_fn in losses.items():
        if starts[name] is None:  # from the better closed-form exportable fit on the fit rows
            starts[name] = min([(T_pre, refit_scale(T_pre)), (Q, s)],
                               key=lambda ts: float(np.sum(w[:, None] * (rms_normed(z @ ts[0], eps) * ts[1]
                                                                         - target) ** 2)))
        T0, s0 = starts[name]
        params = {"T": jnp.asarray(T0, jnp.float32), "s": jnp.asarray(s0, jnp.float32)}
        opt = optax.adam(optax.cosine_decay_schedule(1e-3 * float(np.sqrt(np.mean(T0 ** 2))) * 10, adam_epochs * 20))
        state = opt.init(params)

        @jax.jit
        def step(params, state, idx):
            def total(p):
                per = loss_fn(p, zj[idx], yj[idx], hj[idx], tj[idx], rtj[idx])
                return jnp.sum(per * wj[idx]) / jnp.maximum(jnp.sum(wj[idx]), 1.0)
            value, grads = jax.value_and_grad(total)(params)
            if name == "prenorm_cosine":
                grads = {"T": grads["T"], "s": jnp.zeros_like(grads["s"])}
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        rng = np.random.default_rng(seed)
        n_rows = z.shape[0]
        batch = max(1, n_rows // 20)
        trace = []
        t0 = time.time()
        with jax.default_matmul_precision("highest"):
            for epoch in range(adam_epochs):
                order = rng.permutation(n_rows)
                values = []
                for b in range(20):
                    params, state, v = step(params, state, jnp.asarray(order[b * batch:(b + 1) * batch]))
                    values.append(float(v))
                trace.append(float(np.mean(values)))
        T_new = np.asarray(params["T"], np.float64)
        s_new = refit_scale(T_new) if name == "prenorm_cosine" else np.asarray(params["s"], np.float64)
        out[name] = ("layer", T_new, s_new)
        print(name, "loss per epoch", [round(v, 5) for v in trace[:: max(1, adam_epochs // 6)]] + [round(trace[-1], 5)],
              f"{time.time() - t0:.0f}s", flush=True)
    return out


def branch(fold, rows, g, eps):
    z, m = rows["z"].astype(np.float64), rows["m"].astype(np.float64)
    if fold[0] == "explicit":
        return m @ fold[1]
    _, down_map, scale = fold
    r = rms_normed(z if down_map is None else z @ down_map, eps)
    return r * scale


def folded_layer(layer, fold):
    layer = dict(layer)
    _, down_map, scale = fold
    if down_map is not None:
        mlp = dict(layer["mlp"])
        mlp["down_proj"] = {"kernel": jnp.asarray((np.asarray(layer["mlp"]["down_proj"]["kernel"], np.float64)
                                                   @ down_map).astype(np.float32))}
        layer["mlp"] = mlp
    layer["post_feedforward_layernorm"] = {"scale": jnp.asarray((scale - 1.0).astype(np.float32))}
    return layer


def heldout_nll(params, config, docs, width, start=None, T=None):
    """Summed NLL and token count of ``docs`` through ``params``; with ``T`` (explicit option) the layer
    ``start - 1`` of the pruned model adds ``M T`` instead of ``M``."""
    family = family_for(config.model_type)

    @jax.jit
    def nll(ids, mask):
        ctx = family.attention_context(config, ids.shape, mask)
        h = family.embed(params, ids)
        for i, layer in enumerate(params["layers"]):
            h_next, y, m = family.decoder_layer(layer, config, i, h, ctx)
            h = y + jnp.einsum("bsd,de->bse", m, T, precision=HIGHEST) if (T is not None and i == start - 1) else h_next
        logits = family.lm_head(params, config, family.final_norm(params, config, h)).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits[:, :-1], -1)
        picked = jnp.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
        valid = (mask[:, 1:] > 0)
        return jnp.sum(jnp.where(valid, logz - picked, 0.0)), jnp.sum(valid)

    total, count = 0.0, 0
    with jax.default_matmul_precision("highest"):
        for ids, mask in batches(docs, 8, width):
            a, b = nll(ids, mask)
            total += float(a)
            count += int(b)
    return total, count


EXPLICIT_KEY = "explicit_output_map"  # a layer's extra entry: the explicit option's T (M -> M T)


@contextlib.contextmanager
def explicit_map_forward():
    """While active, ``gemma.decoder_layer`` (which ``gemma.forward``, and so the evaluator, calls) adds
    ``M T`` in place of ``M`` in a layer whose params carry T under ``EXPLICIT_KEY``; other layers run
    unchanged. The extra entry changes the params' tree structure, so no function compiled for a plain
    model is reused for the explicit one (or the other way round)."""
    plain_layer = gemma.decoder_layer

    def decoder_layer(layer, c, layer_index, h, ctx):
        if EXPLICIT_KEY not in layer:
            return plain_layer(layer, c, layer_index, h, ctx)
        _, y, m = plain_layer({k: v for k, v in layer.items() if k != EXPLICIT_KEY}, c, layer_index, h, ctx)
        return y + jnp.einsum("bsd,de->bse", m, layer[EXPLICIT_KEY], precision=HIGHEST), y, m

    gemma.decoder_layer = decoder_layer
    try:
        yield
    finally:
        gemma.decoder_layer = plain_layer


def option_params(name, fold, params, config, pruned, pruned_config, start):
    """``(params, config)`` of an option as a model: the original, the dropped block, a layer fold, or the
    pruned params with the explicit T on layer ``start - 1`` (see ``explicit_map_forward``)."""
    if name == "original":
        return params, config
    if name == "uidl":
        return pruned, pruned_config
    layers = list(pruned["layers"])
    if fold[0] == "explicit":
        layers[start - 1] = dict(layers[start - 1], **{EXPLICIT_KEY: jnp.asarray(fold[1], jnp.float32)})
    else:
        layers[start - 1] = folded_layer(layers[start - 1], fold)
    return dict(pruned, layers=layers), pruned_config


def evaluate_options(models, tokenizer, args, on_result) -> dict:
    """Each task of ``args.tasks`` (limits as ``replaceme-jax evaluate --limit``) for each model of
    ``models`` (name -> (params, config)) with the project's evaluator; ``on_result(results)`` after each
    model (to keep partial results)."""
    names = parse_task_list(args.tasks)
    limits = parse_limits(args.limit, names)
    tasks = [load_task(name, args.data_dir, limits[name]) for name in names]
    results = {}
    with explicit_map_forward():
        for name, (p, c) in models.items():
            entry = results[name] = {"num_hidden_layers": c.num_hidden_layers, "results": {}, "timing": {}}
            for task in tasks:
                result = run_task(p, c, tokenizer, task, max_length=args.eval_max_length,
                                  batch_size=args.eval_batch_size)
                entry["results"][task.name] = result.metrics
                entry["timing"][task.name] = result.timing()
                print("evaluate", name, task.name, {k: round(v, 4) for k, v in result.metrics.items()
                                                     if isinstance(v, float)}, result.timing(), flush=True)
            on_result(results)
    return {"tasks": names, "limits": limits, "max_length": args.eval_max_length,
            "batch_size": args.eval_batch_size, "models": results}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default="../shared/data/calibration/c4_sample.jsonl")
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--start", type=int, default=None, help="block start (default: least angular distance)")
    parser.add_argument("--first", choices=("exclude", "include"), default="exclude")
    parser.add_argument("--ridge", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default=None, help="folder to keep the rows in between runs")
    parser.add_argument("--tasks", default=None, help="evaluate the options on these tasks (as `evaluate --tasks`)")
    parser.add_argument("--limit", default=None, help="per-task limits (as `evaluate --limit`)")
    parser.add_argument("--data-dir", default=None, help="task files (default: ../shared/data/eval)")
    parser.add_argument("--eval-options", default=None, help="comma-separated options to evaluate (default: all)")
    parser.add_argument("--eval-max-length", type=int, default=1024)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    args = parser.parse_args()

    t0 = time.time()
    model = load_model(args.model)
    tokenizer = load_tokenizer(model)
    params, config = model.params, model.config
    eps = config.rms_norm_eps
    docs = documents(tokenizer, args.docs + args.heldout, args.max_length, args.data)
    fit_docs, held_docs = docs[:args.docs], docs[args.docs:]
    width = args.max_length
    result = {"model": args.model, "docs": len(fit_docs), "heldout_docs": len(held_docs), "max_length": width,
              "n": args.n, "first_token_rows": args.first}
    key = f"{args.docs}_{args.heldout}_{width}_{args.n}_{args.start}"
    cached = Path(args.cache) / f"rows_{key}.npz" if args.cache else None
    if cached is not None and cached.is_file():
        stored = dict(np.load(cached, allow_pickle=True))
        dist = json.loads(str(stored["distances"]))
        dist = {int(k): v for k, v in dist.items()}
        fit = {k[4:]: v for k, v in stored.items() if k.startswith("fit_")}
        held = {k[5:]: v for k, v in stored.items() if k.startswith("held_")}
        start = args.start or min(dist, key=dist.get)
    else:
        dist = distances(params, config, fit_docs, args.n, width)
        start = args.start or min(dist, key=dist.get)
        fit = rows_of(params, config, fit_docs, start, end := start + args.n, width)
        held = rows_of(params, config, held_docs, start, end, width)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, distances=json.dumps(dist), **{f"fit_{k}": v for k, v in fit.items()},
                     **{f"held_{k}": v for k, v in held.items()})
    end = start + args.n
    result.update(distances={str(k): round(v, 4) for k, v in dist.items()}, block=[start, end])
    print("block", start, end, f"{time.time() - t0:.0f}s", flush=True)
    fit["w"] = (fit["pos"] > 0).astype(np.float64) if args.first == "exclude" else np.ones(len(fit["pos"]))
    g = 1.0 + np.asarray(params["layers"][start - 1]["post_feedforward_layernorm"]["scale"], np.float64)
    target_energy = np.sum((fit["h_end"] - fit["y"]).astype(np.float64) ** 2, -1)
    result["rows"] = {"fit": int(len(fit["pos"])), "heldout": int(len(held["pos"])),
                      "first_position_energy_share": float(target_energy[fit["pos"] == 0].sum() / target_energy.sum())}
    print("rows", result["rows"], f"{time.time() - t0:.0f}s", flush=True)

    fits = fit_all(fit, g, eps, args.ridge, args.epochs)
    print("fitted", f"{time.time() - t0:.0f}s", flush=True)

    h_end = held["h_end"].astype(np.float64)
    y = held["y"].astype(np.float64)
    first = held["pos"] == 0

    def rel_err(h_start, rows):
        num = np.sum((h_start - h_end) ** 2, -1)
        den = np.sum(h_end ** 2, -1)
        return {"rest": float(num[~rows].sum() / den[~rows].sum()), "first": float(num[rows].sum() / den[rows].sum())}

    options = {"original": None, "uidl": None} | fits
    table = {}
    base_nll, tokens = heldout_nll(params, config, held_docs, width)
    table["original"] = {"ppl": math.exp(base_nll / tokens)}
    pruned, pruned_config = replace_block(params, config, start, end, None)
    nll, _ = heldout_nll(pruned, pruned_config, held_docs, width)
    table["uidl"] = {"ppl": math.exp(nll / tokens), "err": rel_err(y + held["m"].astype(np.float64), first)}
    for name, fold in fits.items():
        t1 = time.time()
        err = rel_err(y + branch(fold, held, g, eps), first)
        if fold[0] == "explicit":
            nll, _ = heldout_nll(pruned, pruned_config, held_docs, width, start=start,
                                 T=jnp.asarray(fold[1], jnp.float32))
        else:
            layers = list(pruned["layers"])
            layers[start - 1] = folded_layer(layers[start - 1], fold)
            nll, _ = heldout_nll(dict(pruned, layers=layers), pruned_config, held_docs, width)
        table[name] = {"ppl": math.exp(nll / tokens), "err": err}
        print(name, table[name], f"{time.time() - t1:.0f}s", flush=True)
    result["options"] = table
    result["heldout_tokens"] = tokens
    result["seconds"] = round(time.time() - t0)

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    save()
    if args.tasks:
        chosen = args.eval_options.split(",") if args.eval_options else list(options)
        unknown = sorted(set(chosen) - set(options))
        if unknown:
            raise SystemExit(f"--eval-options: unknown {unknown} (choose from {', '.join(options)})")
        models = {name: option_params(name, options[name], params, config, pruned, pruned_config, start)
                  for name in chosen}
        t1 = time.time()
        result["evaluation"] = evaluate_options(models, tokenizer, args,
                                                lambda partial: (result.update(evaluation={"models": partial}), save()))
        result["evaluation"]["seconds"] = round(time.time() - t1)
        result["seconds"] = round(time.time() - t0)
        save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
