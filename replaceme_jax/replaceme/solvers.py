"""Estimating the linear map T (D x D) that replaces a block. Plain arrays in, arrays out.

``lstsq`` works from the normal equations ``A = sum M^T M``, ``B = sum M^T (h_end - Y)`` (memory
O(D^2) whatever the number of tokens). ``cosine`` needs the rows themselves and runs optax Adam.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from replaceme_jax import interrupt
from replaceme_jax.errors import NumericalError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NormalEquations:
    """Streaming sums for one block, float64 on host."""

    A: np.ndarray  # sum M^T M               [D, D]
    B: np.ndarray  # sum M^T (h_end - Y)      [D, D]
    target_sq: float = 0.0  # sum ||h_end - Y||^2
    end_sq: float = 0.0  # sum ||h_end||^2
    rows: float = 0.0

    @classmethod
    def zeros(cls, dim: int) -> "NormalEquations":
        return cls(A=np.zeros((dim, dim)), B=np.zeros((dim, dim)))

    def __add__(self, other: "NormalEquations") -> "NormalEquations":
        """The sums over both sets of rows."""
        return NormalEquations(self.A + other.A, self.B + other.B, self.target_sq + other.target_sq,
                               self.end_sq + other.end_sq, self.rows + other.rows)

    def copy(self) -> "NormalEquations":
        return NormalEquations(self.A.copy(), self.B.copy(), self.target_sq, self.end_sq, self.rows)

    def residual_sq(self, T: np.ndarray) -> float:
        """sum ||M T - (h_end - Y)||^2 from the sums alone."""
        return float(np.sum(T * (self.A @ T)) - 2.0 * np.sum(T * self.B) + self.target_sq)

    def relative_error(self, T: np.ndarray | None) -> float:
        """||rebuilt h_end - h_end||^2 / ||h_end||^2 over the calibration rows; T=None is plain dropping."""
        T = np.eye(self.A.shape[0]) if T is None else T
        return max(self.residual_sq(T), 0.0) / max(self.end_sq, 1e-300)


@dataclasses.dataclass
class SolveInfo:
    condition_number: float
    method: str


def lstsq_from_normal_equations(A: np.ndarray, B: np.ndarray, alpha: float = 0.0,
                                diag: bool = False, ridge_target: str = "zero") -> tuple[np.ndarray, SolveInfo]:
    """T = (A + alpha I)^{-1} (B + alpha T0) in float64 (Cholesky; eigen-decomposition fallback when singular).

    ``ridge_target`` is T0: ``"zero"`` (the reference's ridge, alpha ||T||^2) or ``"identity"``
    (alpha ||T - I||^2: shrinks towards plain dropping of the block instead of towards nothing).
    """
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    if ridge_target == "identity" and alpha:
        B = B + alpha * np.eye(A.shape[0])
    elif ridge_target not in ("zero", "identity"):
        raise ValueError(f"unknown ridge target {ridge_target!r}")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
        raise NumericalError("normal equations contain NaN or Inf (activations overflowed)")
    dim = A.shape[0]
    if diag:
        denom = np.diag(A) + alpha
        safe = np.where(denom > 0, denom, 1.0)  # B already holds the identity target's alpha
        return np.diag(np.where(denom > 0, np.diag(B) / safe, 1.0)), SolveInfo(float("nan"), "diag")
    regularised = A + alpha * np.eye(dim)
    eig = np.linalg.eigvalsh(regularised)
    cond = float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
    if cond > 1e12:
        log.warning("normal matrix is ill conditioned (condition number %.3g); consider alpha > 0", cond)
    try:
        factor = scipy.linalg.cho_factor(regularised, lower=True, check_finite=False)
        T = scipy.linalg.cho_solve(factor, B, check_finite=False)
        method = "cholesky"
    except np.linalg.LinAlgError:
        # Singular (e.g. dead MLP channels): minimum-norm solution from the eigen-decomposition.
        w, V = np.linalg.eigh(regularised)
        keep = w > w[-1] * dim * np.finfo(np.float64).eps
        T = V[:, keep] @ ((V[:, keep].T @ B) / w[keep, None])
        method = "eigh-pinv"
    if not np.all(np.isfinite(T)):
        raise NumericalError(f"least-squares solution is not finite (condition number {cond:.3g}); set alpha > 0")
    return T, SolveInfo(cond, method)


def lstsq_transform(M: np.ndarray, target: np.ndarray, alpha: float = 0.0, diag: bool = False) -> np.ndarray:
    """Convenience for in-memory rows: T minimising ||M T - target||^2 + alpha ||T||^2."""
    M64 = np.asarray(M, np.float64)
    T64 = np.asarray(target, np.float64)
    return lstsq_from_normal_equations(M64.T @ M64, M64.T @ T64, alpha, diag)[0]


# --- cosine objective ------------------------------------------------------------------------------


def _row_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    eps = 1e-8
    return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def cosine_objective(T, M, target, Y, accurate: bool, loss: str, l1: float = 0.0):
    """Mean loss over rows. default: 1 - cos(M T, target=h_end - Y); accurate: 1 - cos(M T + Y, h_end).
    ``l1`` adds ``l1 * sum|T_ij|``: the paper's "cosine + L1" (section 2.3, Table 5 uses 1e-4)."""
    pred = M @ T
    if accurate:
        pred = pred + Y
    if loss == "mse":
        value = jnp.mean(jnp.sum((pred - target) ** 2, -1))
    else:
        value = jnp.mean(1.0 - _row_cosine(pred, target))
    return value + l1 * jnp.sum(jnp.abs(T)) if l1 else value


@dataclasses.dataclass
class CosineResult:
    T: np.ndarray
    losses: list[float]  # full-data loss before training and after each epoch


def cosine_state(T, opt_state, key, losses: list[float], epochs: int) -> dict:
    """Checkpointable solver state: plain arrays only (scalars as 1-element arrays, losses padded)."""
    padded = np.full(epochs + 1, np.nan)
    padded[: len(losses)] = losses
    # copies: T and the optimiser state are donated to the next epoch
    return {"T": np.array(T), "opt": [np.array(x).reshape(-1) for x in jax.tree.leaves(opt_state)],
            "key": np.asarray(key), "losses": padded, "epochs_done": np.array([len(losses) - 1], np.int64)}


@functools.lru_cache(maxsize=8)
def _cosine_epoch_fn(n: int, steps: int, batch_rows: int, accurate: bool, loss: str, lr: float, l1: float = 0.0):
    """(epoch, full_loss) for one problem shape: jitted, with the rows passed as arguments.

    Closed over, the rows would become constants of the compiled program (hundreds of MB copied into
    it and folded by XLA on every fit; see "CPU scale evidence" in BENCHMARKS.md). As arguments, one
    compilation serves every block of the same shape. T and the optimiser state are donated: each
    epoch replaces them.
    """
    optimizer = optax.adam(lr)

    def batch_loss(T, M, target, Yd, idx):
        return cosine_objective(T, M[idx], target[idx], Yd[idx] if accurate else None, accurate, loss, l1)

    def full_loss(T, M, target, Yd):
        # chunked so the full-data loss does not materialise N x D predictions at once
        chunks = max(1, n // 8192)
        idx = jnp.arange(chunks * (n // chunks)).reshape(chunks, -1)
        return jnp.mean(jax.lax.map(lambda i: batch_loss(T, M, target, Yd, i), idx))

    def epoch(T, state, key, M, target, Yd):
        perm = jax.random.permutation(key, n)[: steps * batch_rows].reshape(steps, batch_rows)

        def step(carry, idx):
            T, state = carry
            value, grad = jax.value_and_grad(batch_loss)(T, M, target, Yd, idx)
            updates, state = optimizer.update(grad, state, T)
            return (optax.apply_updates(T, updates), state), value

        (T, state), _ = jax.lax.scan(step, (T, state), perm)
        return T, state, full_loss(T, M, target, Yd)

    return jax.jit(epoch, donate_argnums=(0, 1)), jax.jit(full_loss)


def fit_cosine(M: np.ndarray, target: np.ndarray, Y: np.ndarray | None = None, *, accurate: bool = False,
               loss: str = "cosine", T0: np.ndarray | None = None, lr: float = 1e-4, epochs: int = 10,
               batch_rows: int = 1024, seed: int = 0, l1: float = 0.0,
               progress: Callable[[int, float], None] | None = None,
               resume: dict | None = None, on_epoch: Callable[[dict], None] | None = None) -> CosineResult:
    """Adam on the cosine (or MSE) objective, rows resident on device, one jitted scan per epoch.

    ``target`` is ``h_end - Y`` in default mode and ``h_end`` in ``accurate`` mode (which needs ``Y``).
    ``l1`` > 0 adds ``l1 * sum|T_ij|`` to the objective (and to the reported losses).
    ``on_epoch`` receives the solver state after each epoch (see ``cosine_state``); passing such a
    state back as ``resume`` continues from it with the same result as an uninterrupted fit.
    """
    if accurate and Y is None:
        raise ValueError("accurate mode needs the attention residual Y")
    n, dim = M.shape
    M = jnp.asarray(M, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    Yd = jnp.asarray(Y, jnp.float32) if accurate else jnp.zeros((1, dim), jnp.float32)
    T = jnp.array(np.eye(dim) if T0 is None else T0, jnp.float32)  # a copy: T is donated to each epoch
    batch_rows = min(batch_rows, n)
    steps = n // batch_rows  # full batches only, so every step has one compiled shape
    optimizer = optax.adam(lr)
    state = optimizer.init(T)
    epoch, full_loss = _cosine_epoch_fn(n, steps, batch_rows, accurate, loss, float(lr), float(l1))

    with jax.default_matmul_precision("highest"):
        key = jax.random.PRNGKey(seed)
        first = 0
        if resume is not None:
            first = int(resume["epochs_done"][0])
            T = jnp.array(resume["T"], jnp.float32)
            leaves, treedef = jax.tree.flatten(state)
            state = jax.tree.unflatten(treedef, [jnp.asarray(v).reshape(l.shape).astype(l.dtype)
                                                 for v, l in zip(resume["opt"], leaves)])
            key = jnp.asarray(resume["key"], jnp.uint32)
            losses = [float(v) for v in resume["losses"][: first + 1]]
        else:
            losses = [float(full_loss(T, M, target, Yd))]
        for i in range(first, epochs):
            interrupt.check()
            key, sub = jax.random.split(key)
            T, state, value = epoch(T, state, sub, M, target, Yd)
            losses.append(float(value))
            if progress:
                progress(i, losses[-1])
            if on_epoch:
                on_epoch(cosine_state(T, state, key, losses, epochs))
    T = np.asarray(T, np.float64)
    if not np.all(np.isfinite(T)):
        raise NumericalError("cosine solver diverged (NaN/Inf in T); lower cosine_lr")
    return CosineResult(T=T, losses=losses)
