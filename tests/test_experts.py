"""Expert statistics, REAP pruning and REAM merging: exact properties on tiny random MoE models."""

import jax
import numpy as np
import pytest

from replaceme_jax.errors import UsageError
from replaceme_jax.experts import (
    ReamOptions,
    collect_statistics,
    num_experts_to_keep,
    prune,
    prune_mlp,
    pseudo_group,
    ream_layer,
    saliency,
    select_experts,
)
from replaceme_jax.experts.merge import permute_expert
from replaceme_jax.experts.prune import apply_layer_params
from replaceme_jax.models import moe
from replaceme_jax.models.common import init_params
from tests.helpers import random_batch

# Pruning and merging below are exact in real arithmetic; in float32 only the order of the sums over
# experts/neurons may change (XLA picks its blocking per shape), i.e. a few ulps of logits ~1: 1e-5.
ATOL = 1e-5

FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=6, num_experts_per_tok=2, intermediate_size=16),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=8, norm_topk_prob=False),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                      head_dim=8, norm_topk_prob=True),
}


def tiny_model(family: str, seed: int = 0):
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, **FAMILIES[family])
    config = moe.config_from_hf(cfg)
    # scale 0.2: routers far from uniform and experts that differ clearly
    params = init_params(moe.param_specs(config), jax.random.PRNGKey(seed), scale=0.2)
    return params, config


def calibration_batches(vocab: int, seed: int = 0):
    lengths = [[12, 5, 9], [7, 7, 2], [16, 1, 4]]
    return [random_batch(vocab, rows, seed=seed + i) for i, rows in enumerate(lengths)]


def logits(params, config, ids, mask, **kwargs):
    with jax.default_matmul_precision("highest"):
        return np.asarray(moe.forward(params, config, ids, mask, **kwargs).logits)


# ---------------------------------------------------------------------------------------------
# Statistics


def _brute_force_statistics(params, config, batches):
    """Per layer, from every real token one at a time in float64: nu_e, EAN, REAP mean, logit Gram."""
    out = []
    hidden = [params["embed_tokens"]["embedding"][ids] for ids, _ in batches]
    for index, layer in enumerate(params["layers"]):
        p = {k: np.asarray(v["kernel"], np.float64) for k, v in layer["mlp"]["experts"].items()}
        router = np.asarray(layer["mlp"]["gate"]["kernel"], np.float64)
        e = router.shape[1]
        count, ean, reap, gram = np.zeros(e), np.zeros(e), np.zeros(e), np.zeros((e, e))
        for b, (ids, mask) in enumerate(batches):
            with jax.default_matmul_precision("highest"):
                ctx = moe.attention_context(config, ids.shape, mask)
                hidden[b], _, _, aux = moe.decoder_layer_with_aux(layer, config, index, hidden[b], ctx)
            x = np.asarray(aux.x, np.float64)
            for t in np.flatnonzero(mask.reshape(-1)):
                z = x[t] @ router
                gram += np.outer(z, z)
                probs = np.exp(z - z.max())
                probs /= probs.sum()
                top = np.argsort(-probs)[: config.num_experts_per_tok]
                gates = probs[top] / (probs[top].sum() if config.norm_topk_prob else 1.0)
                for g, j in zip(gates, top):
                    a = x[t] @ p["gate_proj"][j]
                    f = (a / (1 + np.exp(-a)) * (x[t] @ p["up_proj"][j])) @ p["down_proj"][j]
                    count[j] += 1
                    ean[j] += np.linalg.norm(f)
                    reap[j] += g * np.linalg.norm(f)
        out.append(dict(frequency=count, ean=ean, reap=np.divide(reap, count, out=np.zeros(e), where=count > 0),
                        gram=gram))
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_streamed_statistics_equal_brute_force(family):
    params, config = tiny_model(family)
    batches = calibration_batches(config.vocab_size)
    with jax.default_matmul_precision("highest"):
        streamed = collect_statistics(params, config, batches)
    expected = _brute_force_statistics(params, config, batches)
    for stats, brute in zip(streamed, expected):
        assert float(stats.tokens) == sum(int(m.sum()) for _, m in batches)
        np.testing.assert_array_equal(saliency(stats, "frequency"), brute["frequency"])
        # float32 sums of ~20 terms vs float64: relative 1e-5
        np.testing.assert_allclose(saliency(stats, "ean"), brute["ean"], rtol=1e-5)
        np.testing.assert_allclose(saliency(stats, "reap"), brute["reap"], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(stats.logit_gram), brute["gram"], rtol=1e-5, atol=1e-5)


def test_statistics_ignore_pad_tokens():
    params, config = tiny_model("qwen3_moe")
    ids, mask = random_batch(config.vocab_size, [6, 3], seed=5)
    garbage = ids.copy()
    garbage[mask == 0] = 7  # different pad ids: statistics must not change
    a, b = collect_statistics(params, config, [(ids, mask)]), collect_statistics(params, config, [(garbage, mask)])
    for sa, sb in zip(a, b):
        for field in ("tokens", "counts", "ean", "reap", "gated_output", "logit_gram"):
            np.testing.assert_allclose(np.asarray(getattr(sa, field)), np.asarray(getattr(sb, field)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pruning


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reap_pruning_equals_original_with_pruned_router_logits_at_minus_inf(family):
    params, config = tiny_model(family)
    batches = calibration_batches(config.vocab_size)
    stats = collect_statistics(params, config, batches)
    num_keep = num_experts_to_keep(config, compression_ratio=0.5)
    keep = [select_experts(saliency(s, "reap"), num_keep) for s in stats]
    pruned, pruned_config = prune(params, config, keep)
    assert pruned_config.num_experts == num_keep == config.num_experts // 2
    assert pruned["layers"][0]["mlp"]["experts"]["down_proj"]["kernel"].shape[0] == num_keep

    ids, mask = random_batch(config.vocab_size, [10, 4], seed=9)
    masks = [np.isin(np.arange(config.num_experts), k) for k in keep]
    expected = logits(params, config, ids, mask, expert_masks=masks)
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits(pruned, pruned_config, ids, mask)[valid], expected[valid], atol=ATOL)
    assert np.abs(logits(params, config, ids, mask)[valid] - expected[valid]).max() > 1e-3  # pruning did something


def test_frequency_baseline_keeps_the_most_used_experts():
    params, config = tiny_model("mixtral")
    stats = collect_statistics(params, config, calibration_batches(config.vocab_size))
    counts = np.asarray(stats[0].counts)
    keep = select_experts(saliency(stats[0], "frequency"), 3)
    np.testing.assert_array_equal(np.sort(counts[keep]), np.sort(counts)[-3:])
    assert list(keep) == sorted(keep)


def test_ranking_ties_go_to_the_lower_index():
    np.testing.assert_array_equal(select_experts(np.array([1.0, 3.0, 1.0, 3.0, 0.0]), 3), [0, 1, 3])


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=1), "cannot keep 1 experts per layer: fewer than num_experts_per_tok=2"),
    (dict(compression_ratio=0.9), "fewer than num_experts_per_tok=2"),
    (dict(num_experts=7), "the model has 6"),
    (dict(num_experts=3, compression_ratio=0.5), "exactly one"),
])
def test_keeping_too_few_or_too_many_experts_is_refused(kwargs, message):
    _, config = tiny_model("mixtral")
    with pytest.raises(UsageError, match=message):
        num_experts_to_keep(config, **kwargs)


# ---------------------------------------------------------------------------------------------
# REAM


def test_permuting_an_experts_neurons_leaves_the_model_unchanged():
    params, config = tiny_model("qwen2_moe")
    ids, mask = random_batch(config.vocab_size, [9, 5], seed=2)
    before = logits(params, config, ids, mask)
    experts = params["layers"][0]["mlp"]["experts"]
    perm = np.random.default_rng(0).permutation(experts["gate_proj"]["kernel"].shape[-1])
    for e in range(config.num_experts):
        permuted = permute_expert({p: np.asarray(experts[p]["kernel"][e]) for p in experts}, perm)
        experts = {p: {"kernel": experts[p]["kernel"].at[e].set(permuted[p])} for p in experts}
    params["layers"][0]["mlp"]["experts"] = experts
    np.testing.assert_allclose(logits(params, config, ids, mask), before, atol=ATOL)


def test_ream_without_absorbed_experts_equals_reap():
    params, config = tiny_model("qwen3_moe")
    stats = collect_statistics(params, config, calibration_batches(config.vocab_size))
    for layer, s in zip(params["layers"], stats):
        sal = saliency(s, "reap")
        merged, info = ream_layer(layer["mlp"], config, sal, np.zeros((8, 8)), None, 5, ReamOptions(group_size=1,
                                                                                                     alignment="none"))
        pruned = prune_mlp(layer["mlp"], select_experts(sal, 5))
        assert all(len(g) == 1 for g in info.groups) and len(info.dropped) == 3
        for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(pruned)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("alignment", ["activation+weight", "activation", "weight"])
def test_merging_a_permuted_copy_of_an_expert_loses_nothing(alignment):
    """Expert 4 is expert 1 with its neurons shuffled: aligned and averaged into expert 1, it gives back
    expert 1 exactly, so the merged model equals the original with expert 4 removed."""
    params, config = tiny_model("mixtral", seed=3)
    mlp = params["layers"][1]["mlp"]
    experts = mlp["experts"]
    perm = np.random.default_rng(1).permutation(config.moe_intermediate_size)
    copy = permute_expert({p: np.asarray(experts[p]["kernel"][1]) for p in experts}, perm)
    mlp["experts"] = {p: {"kernel": experts[p]["kernel"].at[4].set(copy[p])} for p in experts}
    x_sample = jax.random.normal(jax.random.PRNGKey(0), (64, config.hidden_size))
    sal = np.array([0.5, 0.9, 0.6, 0.7, 0.3, 0.8])  # expert 1 most salient, expert 4 least
    merged, info = ream_layer(mlp, config, sal, np.ones((6, 6)), x_sample, 5,
                              ReamOptions(group_size=2, alignment=alignment))
    assert info.groups == [[0], [1, 4], [2], [3], [5]]
    np.testing.assert_array_equal(info.permutations[4], np.argsort(perm))  # the inverse shuffle
    for p in experts:
        np.testing.assert_allclose(np.asarray(merged["experts"][p]["kernel"][1]),
                                   np.asarray(experts[p]["kernel"][1]), atol=1e-6)

    merged_params, merged_config = apply_layer_params(
        params, config, [prune_mlp(params["layers"][0]["mlp"], [0, 1, 2, 3, 5]), merged])
    ids, mask = random_batch(config.vocab_size, [8, 3], seed=4)
    masks = [np.arange(6) != 4] * 2
    np.testing.assert_allclose(logits(merged_params, merged_config, ids, mask),
                               logits(params, config, ids, mask, expert_masks=masks), atol=ATOL)


def test_merge_is_the_saliency_weighted_average():
    params, config = tiny_model("mixtral", seed=1)
    mlp = params["layers"][0]["mlp"]
    sal = np.array([0.0, 2.0, 1.0, 0.5, 0.25, 3.0])
    distances = np.ones((6, 6))
    distances[5, 0] = distances[0, 5] = 0.1  # expert 0 is nearest to the most salient centroid 5
    merged, info = ream_layer(mlp, config, sal, distances, None, 4, ReamOptions(group_size=2, alignment="none"))
    assert info.groups == [[1, 4], [2], [3], [5, 0]]
    # expert 0 never routed to: it weighs as the smallest positive saliency (0.25), as in REAM's code
    np.testing.assert_allclose(info.weights[3], [3.0 / 3.25, 0.25 / 3.25])
    for p, kernel in mlp["experts"].items():
        k = np.asarray(kernel["kernel"])
        np.testing.assert_allclose(np.asarray(merged["experts"][p]["kernel"][3]),
                                   (3.0 * k[5] + 0.25 * k[0]) / 3.25, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["gate"]["kernel"]),
                                  np.asarray(mlp["gate"]["kernel"])[:, [1, 2, 3, 5]])


def test_pseudo_grouping_follows_saliency_order_and_group_size():
    sal = np.array([5.0, 1.0, 4.0, 0.5, 0.2, 0.1])
    d = np.full((6, 6), 0.9)
    np.fill_diagonal(d, 0.0)
    d[0, [1, 3, 4]] = d[[1, 3, 4], 0] = [0.1, 0.2, 0.3]  # 1, 3, 4 all nearest to centroid 0
    d[2, [4, 5]] = d[[4, 5], 2] = [0.35, 0.4]  # 4 is nearer to 0 than to 2
    # C = 3: centroid 0 takes 1 and 3; centroid 2 takes 4 and 5
    assert pseudo_group(sal, d, 2, 3) == ([[0, 1, 3], [2, 4, 5]], [])
    # C = 2: groups fill up, the rest is dropped
    assert pseudo_group(sal, d, 2, 2) == ([[0, 1], [2, 4]], [3, 5])
    # C = 0: every expert joins its nearest centroid
    assert pseudo_group(sal, d, 2, 0) == ([[0, 1, 3, 4], [2, 5]], [])


def test_a_duplicated_expert_is_at_distance_zero():
    from replaceme_jax.experts import expert_distances, sample_statistics
    from replaceme_jax.experts.stats import logit_cosine

    params, config = tiny_model("mixtral", seed=2)
    mlp = params["layers"][0]["mlp"]
    mlp["gate"]["kernel"] = mlp["gate"]["kernel"].at[:, 3].set(mlp["gate"]["kernel"][:, 0])
    mlp["experts"] = {p: {"kernel": k["kernel"].at[3].set(k["kernel"][0])} for p, k in mlp["experts"].items()}
    stats = collect_statistics(params, config, calibration_batches(config.vocab_size))[0]
    x_sample = jax.random.normal(jax.random.PRNGKey(1), (40, config.hidden_size))
    for options in (ReamOptions(), ReamOptions(router_similarity="cosine", output_similarity="token_mean")):
        d = expert_distances(logit_cosine(stats), sample_statistics(mlp, x_sample, chunk=16), options)
        np.testing.assert_allclose(d, d.T, atol=1e-12)
        assert d[0, 3] < 1e-6 and np.all(d[0, [1, 2, 4, 5]] > 1e-3)


def test_sequential_calibration_follows_the_compressed_layers():
    from replaceme_jax.experts import LayerwiseCalibration

    params, config = tiny_model("qwen2_moe")
    batches = calibration_batches(config.vocab_size)
    run = LayerwiseCalibration(params, config, batches, sample_tokens=10, seed=0)
    assert sum(len(i) for i in run.sample_index) == 10
    keep = [0, 2, 3, 5]
    pruned, pruned_config = prune(params, config, [keep, keep])
    run.advance(pruned["layers"][0])
    for (ids, mask), h in zip(batches, run.hidden):
        with jax.default_matmul_precision("highest"):
            expected = moe.forward(pruned, pruned_config, ids, mask, num_layers=1, compute_logits=False)
        valid = mask.astype(bool)
        np.testing.assert_allclose(h[valid], np.asarray(expected.hidden_states[-1])[valid], atol=1e-5)


def test_residual_streams_wait_on_disk_one_layer_at_a_time_and_are_deleted_on_close(tmp_path):
    """Between layers the streams are files (one per batch) in a temporary directory, not arrays held by
    the process, so its memory does not grow with the calibration tokens: advancing replaces the files
    (at most two layers' worth exist, during a layer's pass), and ``close`` removes the directory."""
    from replaceme_jax.experts import LayerwiseCalibration
    from replaceme_jax.experts.calibrate import ResidualStreams

    params, config = tiny_model("qwen2_moe")
    batches = calibration_batches(config.vocab_size)
    with LayerwiseCalibration(params, config, batches, spill_dir=tmp_path) as run:
        (spill,) = list(tmp_path.iterdir())
        assert isinstance(run.hidden, ResidualStreams) and len(list(spill.iterdir())) == len(batches)
        embedded = [np.asarray(moe.forward(params, config, ids, mask, num_layers=0, compute_logits=False)
                               .hidden_states[-1]) for ids, mask in batches]
        for h, expected in zip(run.hidden, embedded):  # read back bit for bit
            np.testing.assert_array_equal(h, expected)
        _, _, outputs = run.statistics(params["layers"][0])
        assert len(list(spill.iterdir())) == 2 * len(batches)
        run.advance(outputs=outputs)
        assert len(list(spill.iterdir())) == len(batches)
        run.statistics(params["layers"][1])
        run.advance(params["layers"][1])  # recomputed through a layer: the pass's own outputs are dropped
        assert len(list(spill.iterdir())) == len(batches)
    assert not spill.exists()


def test_reconstruction_error_is_the_relative_change_of_the_moe_output():
    from replaceme_jax.experts.prune import prune_mlp
    from replaceme_jax.experts.stats import reconstruction_error

    params, config = tiny_model("qwen2_moe")
    mlp = params["layers"][0]["mlp"]
    x = jax.random.normal(jax.random.PRNGKey(3), (37, config.hidden_size))
    with jax.default_matmul_precision("highest"):
        assert reconstruction_error(mlp, mlp, config, x, chunk=8) == 0.0
        pruned = prune_mlp(mlp, np.array([0, 2, 3]))
        ours = reconstruction_error(mlp, pruned, config, x, chunk=8)  # chunks of 8: sums over 5 chunks
        old = np.asarray(moe.moe_block(mlp, config, x[None])[0][0], np.float64)
        new = np.asarray(moe.moe_block(pruned, config.with_experts(3), x[None])[0][0], np.float64)
    expected = np.sum((new - old) ** 2) / np.sum(old**2)
    assert expected > 1e-3
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
