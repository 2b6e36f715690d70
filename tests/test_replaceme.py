"""ReplaceMe properties on tiny random models: selection, the lstsq and cosine solvers, merge, export."""

import json
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from replaceme_jax.conversion import load_model, load_tokenizer
from replaceme_jax.capture import CaptureSpec, RowPolicy, collect_rows, run_capture
from replaceme_jax.cli import main
from replaceme_jax.config import CompressConfig, from_dict
from replaceme_jax.errors import UsageError
from replaceme_jax.models import llama
from replaceme_jax.replaceme import fit_cosine, lstsq_from_normal_equations, replace_block, select_blocks
from replaceme_jax.replaceme.pipeline import compress, read_transforms
from tests.helpers import WORDS, make_model, random_batch, torch_logits


def write_corpus(path, rows=48, seed=0, min_words=6, max_words=40):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def run_config(tmp_path, model_dir, **overrides):
    raw = dict(model_path=str(model_dir), dataset=str(write_corpus(tmp_path / "data.jsonl")), max_length=48,
               batch_size=8, dataset_size=48, save_path=str(tmp_path / "out"), layers_to_skip=2)
    raw.update(overrides)
    return from_dict(CompressConfig, raw)


def zero_layers(model_dir, layers):
    """Make layers identities: zeroed o_proj and down_proj add nothing to the residual stream."""
    path = model_dir / "model.safetensors"
    with safe_open(str(path), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for i in layers:
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"][:] = 0
        # every down projection of the MLP: the dense one, each expert's, the shared expert's
        for key in [k for k in tensors if k.startswith(f"model.layers.{i}.mlp.") and "down_proj" in k]:
            tensors[key][:] = 0
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_identity_block_is_selected_and_removed_exactly(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=7)
    zero_layers(tmp_path / "m", [3, 4])
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    # the distance alone: on a random model another block's map can score as well on held-out text
    result = compress(run_config(tmp_path, tmp_path / "m", block_choice="distance"))
    assert result.report["blocks"] == [[3, 5]]
    assert result.distances[3] == pytest.approx(0.0, abs=1e-3)
    assert min(d for s, d in result.distances.items() if s != 3) > 0.05
    # target h_end - Y = M exactly, so T = I up to float64 round-off
    np.testing.assert_allclose(result.blocks[0].T, np.eye(32), atol=1e-6)
    # computed from sums of float32 per-batch products (relative precision ~1e-7): zero up to that
    assert result.blocks[0].relative_error_with_T == pytest.approx(0.0, abs=1e-6)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert pruned.config.num_hidden_layers == 5
    ids, mask = random_batch(128, [20, 11], seed=3)
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(pruned, ids, mask)[valid], torch_logits(original, ids, mask)[valid],
                               atol=1e-4)


def manual_forward_with_explicit_T(params, config, ids, mask, start, end, T):
    """The unmerged model: layers < start, then h = Y + M T at layer start-1, skip the block, go on."""
    ctx = llama.attention_context(config, ids.shape, mask)
    h = llama.embed(params, ids)
    for i, layer in enumerate(params["layers"]):
        if start <= i < end:
            continue
        h_next, y, m = llama.decoder_layer(layer, config, i, h, ctx)
        h = y + m @ jnp.asarray(T, jnp.float32) if i == start - 1 else h_next
    return llama.lm_head(params, config, llama.final_norm(params, config, h))


def test_merged_model_equals_unmerged_plus_explicit_transform(tmp_path):
    make_model(tmp_path / "m", "qwen2", num_hidden_layers=6)  # qwen2: no down_proj bias, q/k/v biases
    make_model(tmp_path / "b", "llama", num_hidden_layers=6, mlp_bias=True)  # down_proj with a bias
    for name in ("m", "b"):
        model = load_model(tmp_path / name)
        T = np.eye(32) + 0.1 * np.random.default_rng(0).standard_normal((32, 32))
        params, config = replace_block(model.params, model.config, 2, 5, T)
        assert config.num_hidden_layers == 3 and len(params["layers"]) == 3
        ids, mask = random_batch(128, [16, 9], seed=1)
        with jax.default_matmul_precision("highest"):
            merged = llama.forward(params, config, ids, mask).logits
            explicit = manual_forward_with_explicit_T(model.params, model.config, ids, mask, 2, 5, T)
        # the two differ only by float32 rounding of (M W) T vs M (W T)
        np.testing.assert_allclose(np.asarray(merged), np.asarray(explicit), atol=2e-5)


def test_lstsq_T_equals_float64_numpy_solution_on_the_same_rows(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=5)
    model = load_model(tmp_path / "m")
    cfg = run_config(tmp_path, tmp_path / "m")
    from replaceme_jax.data import calibration_batches

    batches = calibration_batches(cfg, load_tokenizer(model), model.params, model.config)
    for rows in (RowPolicy(), RowPolicy(include_pad_rows=True), RowPolicy(exclude_first_token=True)):
        eq = run_capture(model.params, model.config, CaptureSpec(stats_blocks=((2, 4),), rows=rows),
                         batches).equations[0]
        data = collect_rows(model.params, model.config, (2, 4), rows, batches, max_rows=10**6)
        M = data["M"].astype(np.float64)
        target = data["h_end"].astype(np.float64) - data["Y"].astype(np.float64)
        assert eq.rows == len(M)
        expected = np.linalg.lstsq(M, target, rcond=None)[0]
        T, _ = lstsq_from_normal_equations(eq.A, eq.B)
        # float32 activations, float32-HIGHEST per-batch Gram products: ~1e-6 relative to |T| ~ 1
        np.testing.assert_allclose(T, expected, atol=1e-4 * np.abs(expected).max())
        ridge, _ = lstsq_from_normal_equations(eq.A, eq.B, alpha=3.0)
        np.testing.assert_allclose(ridge, np.linalg.solve(M.T @ M + 3.0 * np.eye(32), M.T @ target),
                                   atol=1e-4 * np.abs(expected).max())
    assert RowPolicy(include_pad_rows=True) != RowPolicy()


def test_diag_lstsq_is_per_channel_ratio():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((200, 6))
    target = M * np.array([1, 2, 3, 4, 5, 6.0])
    T, _ = lstsq_from_normal_equations(M.T @ M, M.T @ target, diag=True)
    np.testing.assert_allclose(np.diag(T), [1, 2, 3, 4, 5, 6], rtol=1e-12)
    assert np.count_nonzero(T - np.diag(np.diag(T))) == 0


def test_cosine_solver_lowers_its_loss_and_accurate_mode_uses_the_attention_residual():
    rng = np.random.default_rng(0)
    n, d = 4096, 16
    M = rng.standard_normal((n, d)).astype(np.float32)
    Y = 3.0 * rng.standard_normal((n, d)).astype(np.float32)
    T_true = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    h_end = Y + M @ T_true
    default = fit_cosine(M, h_end - Y, lr=1e-2, epochs=8, batch_rows=256)
    assert default.losses[-1] < 0.1 * default.losses[0]
    accurate = fit_cosine(M, h_end, Y, accurate=True, lr=1e-2, epochs=8, batch_rows=256)
    assert accurate.losses[-1] < 0.2 * accurate.losses[0]
    # accurate mode sees Y: shifting Y (same target) changes its solution; default mode never reads Y
    shifted = fit_cosine(M, h_end, Y + 5.0, accurate=True, lr=1e-2, epochs=8, batch_rows=256)
    assert np.abs(shifted.T - accurate.T).max() > 1e-2
    ignored = fit_cosine(M, h_end - Y, Y + 5.0, lr=1e-2, epochs=8, batch_rows=256)
    np.testing.assert_array_equal(ignored.T, default.T)


def test_select_blocks_greedy_non_overlapping_and_merge():
    d = {1: 0.5, 2: 0.1, 3: 0.2, 4: 0.15, 5: 0.3, 6: 0.9}
    assert select_blocks(d, 2, 1) == [(2, 4)]
    assert select_blocks(d, 2, 2, merge_consecutive=False) == [(2, 4), (4, 6)]
    assert select_blocks(d, 2, 2, merge_consecutive=True) == [(2, 6)]
    with pytest.raises(UsageError, match="non-overlapping"):
        select_blocks(d, 2, 4)


def test_compress_cli_writes_a_loadable_model_and_report(tmp_path, capsys):
    make_model(tmp_path / "m", "qwen3", num_hidden_layers=6, use_sliding_window=True, sliding_window=8,
               max_window_layers=3)
    write_corpus(tmp_path / "data.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lstsq\nmodel_path: {tmp_path / 'm'}\ndataset: {tmp_path / 'data.jsonl'}\n"
                      f"layers_to_skip: 2\nmax_length: 48\nsave_path: {tmp_path / 'out'}\nnum_A: 2\n"
                      "merge_consecutive: false\n")
    assert main(["compress", "--config", str(config), "-q"]) == 0
    assert "wrote model and report" in capsys.readouterr().out
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "replaceme_report.json", "distances.csv",
                 "distances.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "replaceme_report.json").read_text())
    assert report["num_hidden_layers_before"] == 6 and report["num_hidden_layers_after"] == 2
    assert len(report["blocks"]) == 2 and len(report["distances"]) == 4
    assert report["calibration_tokens"] > 0 and "pass1_distances_and_statistics" in report["wall_time_s"]
    fitted = []
    for block in report["block_results"]:
        validation = block["validation"]
        assert validation["heldout_sequences"] >= 4 and validation["perplexity_original"] > 0
        if validation["fallback"]:  # T lost to dropping on held-out data: the block is dropped without it
            assert block["relative_error_with_T"] is None
            assert validation["perplexity_with_T"] > validation["perplexity_without_T"]
        else:
            assert block["relative_error_with_T"] <= block["relative_error_without_T"]
            fitted.append(block["block"])
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 2 and len(hf_config["layer_types"]) == 2
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if fitted:
        with safe_open(str(out / "replaceme" / "transforms.safetensors"), "numpy") as f:
            assert sorted(f.keys()) == sorted(f"block_{s}_{e}" for s, e in fitted)
            stored = {key: f.get_tensor(key) for key in f.keys()}
        # read_transforms gives the same T's back, by block in the original numbering
        read = read_transforms(out)
        assert sorted(read) == sorted(tuple(b) for b in fitted)
        for (s, e), T in read.items():
            np.testing.assert_array_equal(T, stored[f"block_{s}_{e}"])
    # what compress writes, the loader reads back: the side file is never taken for a weight shard
    assert load_model(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("method,extra", [("uidl", {}), ("cosine", {"cosine_epochs": 2, "cosine_batch_rows": 64}),
                                          ("cosine", {"accurate": True, "cosine_init": "lstsq", "cosine_epochs": 2,
                                                      "cosine_batch_rows": 64})])
def test_other_methods_run_end_to_end(tmp_path, method, extra):
    make_model(tmp_path / "m", "llama", num_hidden_layers=5)
    result = compress(run_config(tmp_path, tmp_path / "m", method=method, **extra))
    block = result.report["block_results"][0]
    if method == "uidl":
        assert result.blocks[0].T is None and block["relative_error_with_T"] is None
    else:
        assert block["solver"]["losses"][-1] < block["solver"]["losses"][0]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 3


def test_distances_command_writes_only_the_profile(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=5)
    write_corpus(tmp_path / "data.jsonl")
    assert main(["distances", "--set", f"model_path={tmp_path / 'm'}", "--set", f"dataset={tmp_path / 'data.jsonl'}",
                 "--set", "layers_to_skip=2", "--set", f"save_path={tmp_path / 'out'}", "-q"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["distances.csv", "distances.png", "replaceme_report.json"]


@pytest.mark.parametrize("args,message", [
    (["--set", "layers_to_skip=9"], "layers_to_skip=9 must be smaller"),
    (["--set", "bogus_key=1"], "unknown config key 'bogus_key'"),
    (["--set", "batch_size=two"], "'batch_size' must be an integer"),
    (["--set", "method=svd"], "'method' must be one of"),
])
def test_bad_config_is_a_one_line_error(tmp_path, capsys, args, message):
    make_model(tmp_path / "m", "llama", num_hidden_layers=5)
    capsys.readouterr()
    code = main(["compress", "--set", f"model_path={tmp_path / 'm'}", "--set", f"save_path={tmp_path / 'out'}",
                 "--set", f"dataset={write_corpus(tmp_path / 'd.jsonl')}", *args, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_too_little_calibration_data_is_refused(tmp_path, capsys):
    make_model(tmp_path / "m", "llama", num_hidden_layers=5)
    write_corpus(tmp_path / "d.jsonl", rows=2, min_words=3, max_words=4)
    code = main(["compress", "--set", f"model_path={tmp_path / 'm'}", "--set", f"save_path={tmp_path / 'out'}",
                 "--set", f"dataset={tmp_path / 'd.jsonl'}", "--set", "layers_to_skip=2", "-q"])
    assert code == 1 and "too little calibration data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_self_generated_calibration_needs_no_data(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=4)
    cfg = from_dict(CompressConfig, dict(model_path=str(tmp_path / "m"), dataset="self", dataset_size=8,
                                         max_length=24, layers_to_skip=1, save_path=str(tmp_path / "out")))
    result = compress(cfg)
    assert result.report["calibration_tokens"] >= 32 and result.report["num_hidden_layers_after"] == 3


def test_identity_ridge_shrinks_towards_dropping_the_block():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((300, 5))
    target = M @ rng.standard_normal((5, 5))
    A, B = M.T @ M, M.T @ target
    T, _ = lstsq_from_normal_equations(A, B, alpha=2.0, ridge_target="identity")
    np.testing.assert_allclose(T, np.linalg.solve(A + 2.0 * np.eye(5), B + 2.0 * np.eye(5)), rtol=1e-10)
    far, _ = lstsq_from_normal_equations(A, B, alpha=1e9, ridge_target="identity")
    np.testing.assert_allclose(far, np.eye(5), atol=1e-5)


def test_normalized_rows_equal_a_weighted_float64_fit(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=4)
    model = load_model(tmp_path / "m")
    cfg = run_config(tmp_path, tmp_path / "m")
    from replaceme_jax.conversion import load_tokenizer
    from replaceme_jax.data import calibration_batches

    batches = calibration_batches(cfg, load_tokenizer(model), model.params, model.config)
    rows = RowPolicy(normalize=True)
    eq = run_capture(model.params, model.config, CaptureSpec(stats_blocks=((1, 3),), rows=rows), batches).equations[0]
    data = collect_rows(model.params, model.config, (1, 3), rows, batches, max_rows=10**6)
    M = data["M"].astype(np.float64)
    target = data["h_end"].astype(np.float64) - data["Y"].astype(np.float64)
    w = 1.0 / np.sum(target * target, -1)
    expected = np.linalg.solve(M.T @ (M * w[:, None]), M.T @ (target * w[:, None]))
    T, _ = lstsq_from_normal_equations(eq.A, eq.B)
    np.testing.assert_allclose(T, expected, atol=1e-4 * np.abs(expected).max())
    assert eq.rows == len(M)


def test_block_choice_heldout_takes_the_candidate_whose_map_scores_best(tmp_path):
    """``block_choice: heldout`` scores the lstsq maps of the lowest-distance blocks on the held-out
    documents and keeps the best; its score of the chosen block is what the block's own search finds
    at the same starting point."""
    make_model(tmp_path / "m", "llama", num_hidden_layers=8)
    result = compress(run_config(tmp_path, tmp_path / "m", block_choice="heldout", block_candidates=3,
                                 save_path=None))
    choice = result.report["block_choice"]
    ranked = sorted(result.distances, key=lambda s: (result.distances[s], s))[:3]
    assert choice["method"] == "heldout" and [c["block"][0] for c in choice["candidates"]] == ranked
    best = min(choice["candidates"], key=lambda c: c["score"])
    assert choice["chosen"] == best["block"] and result.report["blocks"] == [best["block"]]
    searched = result.blocks[0].validation["candidates"]
    same_start = [c["perplexity"] for c in searched if c["first_token_weight"] == best["first_token_weight"]
                  and c["alpha_relative"] == best["alpha_relative"]]
    assert same_start and same_start[0] == pytest.approx(best["perplexity"], rel=1e-5)
    assert result.blocks[0].validation["perplexity_with_T"] <= best["perplexity"] * (1 + 1e-6)
    # the choice scored the whole ridge line through the first search start, not the starts alone
    ridge_line = [c["perplexity"] for c in searched if c["first_token_weight"] == 0.0 and "perplexity" in c]
    assert len(ridge_line) == 5 and best["perplexity"] <= min(ridge_line) * (1 + 1e-6)


def test_block_choice_auto_scores_on_heldout_and_never_scores_a_map_twice(tmp_path, monkeypatch):
    """The default ``block_choice: auto`` is ``heldout`` where it can score. The distance's own block
    gets its whole search, so the chosen block is never worse on the held-out documents than the
    paper's; the chosen block's search takes the perplexities the choice measured."""
    from replaceme_jax.replaceme import validation

    calls = []
    original = validation.HeldoutEvaluator.perplexity
    monkeypatch.setattr(validation.HeldoutEvaluator, "perplexity", lambda self, T: calls.append(
        (id(self.cached), None if T is None else np.asarray(T).tobytes())) or original(self, T))
    make_model(tmp_path / "m", "llama", num_hidden_layers=8)
    result = compress(run_config(tmp_path, tmp_path / "m", block_candidates=3, block_choice_min_tokens=1,
                                 save_path=None))
    choice = result.report["block_choice"]
    assert choice["method"] == "heldout" and choice["requested"] == "auto" and len(choice["candidates"]) == 3
    assert len(calls) == len(set(calls))  # no map (nor the dropped block) scored twice on the same documents
    distance_block, *others = choice["candidates"]
    assert distance_block["searched"] and not any(c["searched"] for c in others)
    for candidate in choice["candidates"]:
        assert candidate["score"] == min(candidate["perplexity"], candidate["perplexity_without_T"])
    chosen = min(choice["candidates"], key=lambda c: c["score"])
    assert result.report["blocks"] == [chosen["block"]] and chosen["score"] <= distance_block["score"]
    validation_record = result.blocks[0].validation
    assert validation_record["perplexity_without_T"] == chosen["perplexity_without_T"]
    assert min(validation_record["perplexity_with_T"], validation_record["perplexity_without_T"]) \
        <= distance_block["score"] * (1 + 1e-9)


def test_block_choice_auto_keeps_the_distance_on_few_heldout_tokens(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    result = compress(run_config(tmp_path, tmp_path / "m", save_path=None))  # ~300 held-out tokens
    choice = result.report["block_choice"]
    assert choice["method"] == "distance" and "fewer than block_choice_min_tokens (4096)" in choice["auto"]


@pytest.mark.parametrize("overrides,reason", [
    (dict(num_A=2), "num_A 2"),
    (dict(method="uidl"), "method uidl"),
    (dict(validation_fraction=0.0, alpha=0.0, first_token_rows="exclude"), "no held-out documents"),
    (dict(one_pass_max_bytes=1), "one_pass_max_bytes"),
])
def test_block_choice_auto_takes_the_distance_where_heldout_cannot_score(tmp_path, overrides, reason):
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    result = compress(run_config(tmp_path, tmp_path / "m", save_path=None, block_choice_min_tokens=1, **overrides))
    choice = result.report["block_choice"]
    assert choice["method"] == "distance" and choice["requested"] == "auto" and reason in choice["auto"]
    lowest = min(result.distances, key=lambda s: (result.distances[s], s))
    assert any(start <= lowest < end for start, end in result.report["blocks"])


@pytest.mark.parametrize("overrides,message", [
    (dict(block_choice="heldout", num_A=2), "chooses one block (num_A: 1)"),
    (dict(block_choice="heldout", method="uidl"), "needs method: lstsq"),
    (dict(block_choice="heldout", validation_fraction=0.0, alpha=0.0, first_token_rows="exclude"),
     "needs method: lstsq and validation_fraction > 0"),
])
def test_block_choice_heldout_refuses_what_it_cannot_score(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        run_config(tmp_path, tmp_path / "m", **overrides).validate()


def test_block_choice_heldout_refuses_before_the_pass_when_statistics_would_not_fit(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    with pytest.raises(UsageError, match="block_choice: heldout needs every candidate's statistics"):
        compress(run_config(tmp_path, tmp_path / "m", block_choice="heldout", one_pass_max_bytes=1, save_path=None))


def test_given_blocks_are_removed_with_the_map_pass_1_gathered_for_them(tmp_path, monkeypatch):
    from replaceme_jax.replaceme import pipeline

    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    passes = []
    capture = pipeline.run_capture
    monkeypatch.setattr(pipeline, "run_capture", lambda *a, **k: passes.append(a[2].stats_blocks) or capture(*a, **k))
    given = compress(run_config(tmp_path, tmp_path / "m", save_path=None, blocks=[[3, 5]], alpha=0.0,
                                first_token_rows="include"))
    assert passes == [((3, 5),)]  # one pass: distances of every candidate, statistics of the given block
    assert given.report["blocks"] == [[3, 5]] and given.report["block_choice"] == {"method": "given", "requested": "auto"}
    assert given.model.config.num_hidden_layers == 4 and len(given.distances) == 4
    # the same block fitted from a statistics pass of its own gives the same map
    separate = compress(run_config(tmp_path, tmp_path / "m", save_path=None, blocks=[[3, 5]], alpha=0.0,
                                   first_token_rows="include", one_pass_max_bytes=1))
    assert passes[1:] == [(), ((3, 5),)]
    assert given.blocks[0].T is not None
    np.testing.assert_allclose(given.blocks[0].T, separate.blocks[0].T, rtol=1e-5, atol=1e-6)


def test_given_blocks_may_differ_in_size(tmp_path):
    """Six layers less by a block of 2 and a block of 1: each gets its map (the second fitted on the model with
    the first replaced), and the first map is the one a run removing that block alone writes."""
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    both = compress(run_config(tmp_path, tmp_path / "m", save_path=None, blocks=[[4, 5], [1, 3]], num_A=2,
                               layers_to_skip=2, alpha=0.0, first_token_rows="include", fallback="none"))
    assert both.report["blocks"] == [[1, 3], [4, 5]] and both.model.config.num_hidden_layers == 3
    assert [(r.start, r.end) for r in both.blocks] == [(1, 3), (4, 5)]
    assert all(r.T is not None and r.relative_error_with_T is not None for r in both.blocks)
    alone = compress(run_config(tmp_path, tmp_path / "m", save_path=None, blocks=[[1, 3]], layers_to_skip=2,
                                alpha=0.0, first_token_rows="include", fallback="none"))
    np.testing.assert_allclose(both.blocks[0].T, alone.blocks[0].T, rtol=1e-5, atol=1e-6)
    assert not np.allclose(both.blocks[1].T, np.eye(both.blocks[1].T.shape[0]), atol=1e-3)


def test_cli_given_blocks_that_touch_are_merged_into_one(tmp_path, capsys):
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    config = tmp_path / "run.yaml"
    config.write_text(f"model_path: {tmp_path / 'm'}\ndataset: {write_corpus(tmp_path / 'data.jsonl')}\n"
                      f"max_length: 48\nmethod: uidl\nsave_path: {tmp_path / 'out'}\n")
    assert main(["compress", "--config", str(config), "--set", "blocks=[[3, 4], [2, 3]]", "--set", "num_A=2",
                 "--set", "layers_to_skip=1"]) == 0
    report = json.loads((tmp_path / "out" / "replaceme_report.json").read_text())
    assert report["blocks"] == [[2, 4]] and report["num_hidden_layers_after"] == 4
    assert report["block_choice"] == {"method": "given", "requested": "auto"}
    # pass 1 measured blocks of one layer, not the merged block of two
    assert report["block_results"][0]["relative_error_without_T"] is None
    assert "block [2, 4]: relative error not measured (not a block of layers_to_skip layers)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides,message", [
    (dict(blocks=[3, 5]), "must be a list of [start, end] pairs"),
    (dict(blocks=[[3, 5.0]]), "must be a list of [start, end] pairs"),
    (dict(blocks=[[3, 5], [1, 3]]), "lists 2 block(s); set num_A: 2 (it is 1)"),
    (dict(blocks=[[3, 3]]), "[3, 3] holds no layers (end must exceed start)"),
    (dict(blocks=[[0, 2]]), "[0, 2] starts before layer 1"),
    (dict(blocks=[[1, 3], [2, 4]], num_A=2), "[2, 4] overlaps the block ending at 3"),
    (dict(blocks=[[1, 3]], block_choice="heldout"), "'blocks' and 'block_choice: heldout' both choose"),
])
def test_given_blocks_refuse_what_cannot_be_removed(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        run_config(tmp_path, tmp_path / "m", **overrides)


def test_given_blocks_past_the_last_layer_are_refused_before_any_pass(tmp_path):
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    with pytest.raises(UsageError, match=re.escape("[5, 7] ends past the model's 6 layers")):
        compress(run_config(tmp_path, tmp_path / "m", blocks=[[5, 7]]))
    assert not (tmp_path / "out").exists()
