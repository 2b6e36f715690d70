"""Cosine solver: rows closed over inside ``jax.jit`` (the old style, rows baked into the program as
constants) against rows passed as arguments (``replaceme_jax.replaceme.solvers.fit_cosine``).

Both fit the same random rows from the same seed; reported: wall time of the first epoch (the
initial loss and compilation included), of each later epoch, of the whole fit, of a second fit of the
same shape (the next block of a ``num_A > 1`` run), and the largest difference between the two T.

    PYTHONPATH=. python bench/cosine_epoch.py --rows 131072 --dim 576 --epochs 2 \
        --out bench/results/cosine_epoch.json
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from replaceme_jax.replaceme.solvers import cosine_objective, fit_cosine


def fit_cosine_closure(M, target, *, lr, epochs, batch_rows, seed, progress):
    """The solver as it was before issue 14 (rows closed over by the jitted epoch), without resume."""
    n, dim = M.shape
    M = jnp.asarray(M, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    T = jnp.asarray(np.eye(dim), jnp.float32)
    batch_rows = min(batch_rows, n)
    steps = n // batch_rows
    optimizer = optax.adam(lr)
    state = optimizer.init(T)

    def batch_loss(T, idx):
        return cosine_objective(T, M[idx], target[idx], None, False, "cosine")

    def full_loss(T):
        chunks = max(1, n // 8192)
        idx = jnp.arange(chunks * (n // chunks)).reshape(chunks, -1)
        return jnp.mean(jax.lax.map(lambda i: batch_loss(T, i), idx))

    @jax.jit
    def epoch(T, state, key):
        perm = jax.random.permutation(key, n)[: steps * batch_rows].reshape(steps, batch_rows)

        def step(carry, idx):
            T, state = carry
            value, grad = jax.value_and_grad(batch_loss)(T, idx)
            updates, state = optimizer.update(grad, state, T)
            return (optax.apply_updates(T, updates), state), value

        (T, state), _ = jax.lax.scan(step, (T, state), perm)
        return T, state, full_loss(T)

    with jax.default_matmul_precision("highest"):
        key = jax.random.PRNGKey(seed)
        losses = [float(jax.jit(full_loss)(T))]
        for i in range(epochs):
            key, sub = jax.random.split(key)
            T, state, value = epoch(T, state, sub)
            losses.append(float(value))
            progress(i, losses[-1])
    return np.asarray(T, np.float64), losses


def timed(fit, **kwargs):
    marks = []
    began = time.perf_counter()
    T, losses = fit(progress=lambda i, loss: marks.append(time.perf_counter()), **kwargs)
    total = time.perf_counter() - began
    epochs = np.diff([began] + marks).tolist()  # the first includes the initial loss and compilation
    return T, losses, {"total_s": total, "epoch_s": epochs}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--dim", type=int, default=576)  # SmolLM2-135M hidden size
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    M = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    mix = (np.eye(args.dim) + 0.1 * rng.standard_normal((args.dim, args.dim))).astype(np.float32)
    target = M @ mix - M  # like h_end - Y: a linear map of M plus noise
    target += 0.1 * rng.standard_normal(target.shape, dtype=np.float32)
    common = dict(lr=args.lr, epochs=args.epochs, batch_rows=args.batch_rows, seed=0)

    def new_style(progress, **kw):
        result = fit_cosine(M, target, progress=progress, **kw)
        return result.T, result.losses

    T_old, losses_old, old = timed(lambda **kw: fit_cosine_closure(M, target, **kw), **common)
    T_new, losses_new, new = timed(new_style, **common)
    # a second fit of the same shape (the next block of a num_A > 1 run): the compiled epoch is reused
    _, _, again = timed(new_style, **common)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, "
           f"{len(jax.devices())} device(s)", "jax": jax.__version__, "rows": args.rows, "dim": args.dim,
           "batch_rows": args.batch_rows, "epochs": args.epochs, "closure": old, "arguments": new,
           "arguments_second_fit": again,
           "speedup_first_epoch": old["epoch_s"][0] / new["epoch_s"][0],
           "speedup_total": old["total_s"] / new["total_s"],
           "max_abs_T_difference": float(np.max(np.abs(T_old - T_new))), "losses_equal": losses_old == losses_new,
           "losses": {"closure": losses_old, "arguments": losses_new}}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
