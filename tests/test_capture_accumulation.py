"""Capture pass 1 walks the layers one jitted step at a time (one compilation per layer kind, whatever
the depth) and keeps its sums on the device in float32 with Kahan compensation: the same hidden
states as the family's forward, T as from a float64 host sum, an exact checkpointed state, and the
first non-finite batch named. Tiny random llamas built in memory (no files)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from replaceme_jax import capture
from replaceme_jax.capture import CaptureSpec, RowPolicy, run_capture
from replaceme_jax.checkpointing import PassState
from replaceme_jax.data.batching import Batch
from replaceme_jax.errors import NumericalError
from replaceme_jax.models import llama
from replaceme_jax.models.common import init_params
from replaceme_jax.replaceme.solvers import lstsq_from_normal_equations


def tiny(layers: int, vocab: int = 64, hidden: int = 32, layer_types=(), sliding_window=None):
    config = llama.LlamaConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               rms_norm_eps=1e-5, rope_theta=10000.0, layer_types=layer_types,
                               sliding_window=sliding_window)
    # scale 0.3: layers that change the residual stream visibly, so T is far from the identity
    return init_params(llama.param_specs(config), jax.random.PRNGKey(layers), scale=0.3), config


def make_batches(count: int, vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1, vocab - 1, (batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, rng.integers(length // 2, length):] = 0  # one padded row per batch
        out.append(Batch(input_ids=ids * mask, attention_mask=mask, n_real_rows=batch, rows=tuple(range(batch))))
    return out


def test_layer_walk_gives_the_forward_hidden_states_with_one_compilation_per_layer_kind(monkeypatch):
    types = ("sliding_attention", "full_attention") * 4
    params, config = tiny(8, vocab=67, layer_types=types, sliding_window=3)
    traced = []
    real = llama.decoder_layer
    monkeypatch.setattr(llama, "decoder_layer", lambda *a, **k: traced.append(a[2]) or real(*a, **k))
    ids, mask = (jnp.asarray(a) for a in (make_batches(1, 67)[0].input_ids, make_batches(1, 67)[0].attention_mask))
    walked = list(capture.walk_layers(params, config, ids, mask, 8, branches_at=(3,)))
    # 8 layers of 2 kinds: 2 compilations, plus 1 for the layer whose Y and M are kept
    assert sorted(traced) == [0, 0, 1]
    monkeypatch.setattr(llama, "decoder_layer", real)
    with jax.default_matmul_precision("highest"):
        out = llama.forward(params, config, ids, mask, collect_layers=True, compute_logits=False)
    def close(a, b):
        # the same float32 ops compiled per layer instead of as one program: differences of a few
        # float32 roundings of the largest values (|h| ~ 10 here)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(np.abs(b).max()))

    for k, h, _, _ in walked:
        close(h, out.hidden_states[k])
    _, _, y3, m3 = walked[3]
    close(y3, out.attn_residuals[2])
    close(m3, out.mlp_outputs[2])
    assert walked[2][2] is None and walked[2][3] is None


def test_deeper_model_compiles_no_more_layer_steps(monkeypatch):
    counts = {}
    real = llama.decoder_layer
    for layers in (4, 12):
        params, config = tiny(layers, vocab=71 + layers)  # a config of its own: no compilation cached
        traced = []
        monkeypatch.setattr(llama, "decoder_layer", lambda *a, **k: traced.append(a[2]) or real(*a, **k))
        starts = tuple(range(1, layers - 1))
        run_capture(params, config, CaptureSpec(distance_starts=starts, distance_n=2,
                                                stats_blocks=tuple((s, s + 2) for s in starts)),
                    make_batches(2, 71 + layers))
        counts[layers] = len(traced)
    assert counts[4] == counts[12] == 2  # one layer step with Y and M, one without


def per_batch_sums(params, config, block, batches, rows) -> list[dict]:
    """Each batch's float32 sums of one block, on the host."""
    start, end = block
    step = jax.jit(capture.block_sums, static_argnames="rows")
    out = []
    with jax.default_matmul_precision("highest"):
        for b in batches:
            ids, mask = jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask)
            walked = list(capture.walk_layers(params, config, ids, mask, end, (start,)))
            _, _, y, m = walked[start]
            out.append(jax.tree.map(np.asarray, step(m, y, walked[end][1], mask, rows=rows)))
    return out


def test_device_kahan_sums_give_the_T_of_a_float64_host_sum():
    params, config = tiny(4)
    batches = make_batches(300, 64, seed=1)
    block, rows = (1, 3), RowPolicy()
    acc = run_capture(params, config, CaptureSpec(stats_blocks=(block,), rows=rows), batches)
    per_batch = per_batch_sums(params, config, block, batches, rows)
    # the reference: the float32 per-batch sums added on the host in float64 (the pre-issue-14 way)
    reference = {k: np.sum([b[k].astype(np.float64) for b in per_batch], axis=0) for k in per_batch[0]}
    A_ref, B_ref = reference["A"].sum(0), reference["B"].sum(0)  # rest + first, as equations[0] under the policy
    eq = acc.equations[0]
    T, _ = lstsq_from_normal_equations(eq.A, eq.B)
    T_ref, _ = lstsq_from_normal_equations(A_ref, B_ref)
    # The bound: T within 1e-6 relative of the float64 host sum's T.
    assert np.linalg.norm(T - T_ref) / np.linalg.norm(T_ref) < 1e-6
    kahan_error = np.abs(eq.A - A_ref).max() / np.abs(A_ref).max()
    assert kahan_error < 1e-7  # a float32 rounding or two, not one per batch
    np.testing.assert_allclose([eq.target_sq, eq.end_sq, eq.rows], reference["scalars"].sum(0), rtol=1e-7)
    # plain float32 accumulation of the same per-batch sums loses more: the compensation is working
    naive = np.zeros_like(per_batch[0]["A"])
    for b in per_batch:
        naive = naive + b["A"]
    naive_error = np.abs(naive.sum(0) - A_ref).max() / np.abs(A_ref).max()
    assert kahan_error < naive_error / 4, (kahan_error, naive_error)
    assert acc.batches == 300


def test_checkpointed_state_is_exact_and_resumes_bitwise(tmp_path):
    params, config = tiny(5)
    batches, heldout = make_batches(7, 64, seed=2), make_batches(2, 64, seed=3)
    spec = CaptureSpec(distance_starts=(1, 2, 3), distance_n=2, stats_blocks=((1, 3), (2, 4)),
                       rows=RowPolicy(exclude_first_token=True))
    clean = run_capture(params, config, spec, batches, heldout_batches=heldout)
    run_capture(params, config, spec, batches[:4], checkpoint=PassState(tmp_path / "p", every=1))
    resumed = run_capture(params, config, spec, batches, heldout_batches=heldout,
                          checkpoint=PassState(tmp_path / "p", every=1))
    assert resumed.batches == clean.batches == 9
    for key, value in clean.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    assert resumed.distances() == clean.distances()
    for split in ("fit", "heldout"):
        for i in range(2):
            np.testing.assert_array_equal(resumed.block_equations(i, split).B, clean.block_equations(i, split).B)
    assert clean.block_equations(0, "heldout").rows > 0


def test_the_first_non_finite_batch_is_named():
    params, config = tiny(3)
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].at[63].set(jnp.nan)
    batches = make_batches(6, 64, seed=4)  # ids below 63
    batches[4].input_ids[1, 0] = 63
    batches[5].input_ids[1, 0] = 63
    spec = CaptureSpec(distance_starts=(1,), distance_n=1, stats_blocks=((1, 2),))
    with pytest.raises(NumericalError, match="calibration batch 4"):
        run_capture(params, config, spec, batches)
