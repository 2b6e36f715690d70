"""The cosine solver with its rows passed to the jitted epoch as arguments (issue 14) gives exactly
what the earlier closure style gave, reuses its compilation across fits, and leaves inputs intact."""

import jax.numpy as jnp
import numpy as np

from replaceme_jax.replaceme import solvers
from tests.helpers import load_bench_script


def closure_style():
    return load_bench_script("cosine_epoch").fit_cosine_closure


def problem(rows=4096, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((rows, dim)).astype(np.float32)
    return M, (M @ (np.eye(dim) + 0.3 * rng.standard_normal((dim, dim)))).astype(np.float32)


def test_rows_as_arguments_give_bitwise_the_closure_result():
    M, target = problem()
    T_old, losses_old = closure_style()(M, target, lr=1e-2, epochs=3, batch_rows=512, seed=5,
                                        progress=lambda i, loss: None)
    new = solvers.fit_cosine(M, target, lr=1e-2, epochs=3, batch_rows=512, seed=5)
    np.testing.assert_array_equal(new.T, T_old)
    assert new.losses == losses_old and new.losses[-1] < new.losses[0]


def test_a_second_fit_of_the_same_shape_reuses_the_compiled_epoch_and_keeps_the_callers_T0():
    M, target = problem(seed=1)
    T0 = jnp.eye(32, dtype=jnp.float32) * 1.5
    first = solvers.fit_cosine(M, target, T0=T0, lr=1e-2, epochs=2, batch_rows=512)
    hits = solvers._cosine_epoch_fn.cache_info().hits
    M2, target2 = problem(seed=2)  # other rows, same shape: the next block of a run
    second = solvers.fit_cosine(M2, target2, T0=T0, lr=1e-2, epochs=2, batch_rows=512)
    assert solvers._cosine_epoch_fn.cache_info().hits == hits + 1
    assert not np.array_equal(first.T, second.T)
    # T is donated to each epoch: the caller's T0 must not be the donated buffer
    np.testing.assert_array_equal(np.asarray(T0), np.eye(32) * 1.5)


def test_cosine_l1_adds_the_penalty_on_T_and_trades_fit_for_a_smaller_l1_norm():
    M, target = problem(seed=3)
    T = np.eye(32, dtype=np.float32) + 0.1
    plain = float(solvers.cosine_objective(T, M, target, None, False, "cosine"))
    penalised = float(solvers.cosine_objective(T, M, target, None, False, "cosine", l1=1e-3))
    np.testing.assert_allclose(penalised - plain, 1e-3 * np.abs(T).sum(), rtol=1e-5)

    free = solvers.fit_cosine(M, target, lr=1e-2, epochs=4, batch_rows=512, seed=5)
    sparse = solvers.fit_cosine(M, target, lr=1e-2, epochs=4, batch_rows=512, seed=5, l1=1e-3)
    assert np.abs(sparse.T).sum() < 0.9 * np.abs(free.T).sum()
    unpenalised_loss = float(solvers.cosine_objective(sparse.T.astype(np.float32), M, target, None, False, "cosine"))
    assert unpenalised_loss > free.losses[-1]
    # the reported losses are of the penalised objective
    np.testing.assert_allclose(sparse.losses[-1], unpenalised_loss + 1e-3 * np.abs(sparse.T).sum(), rtol=1e-4)
