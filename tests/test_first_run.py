"""What a first-time user meets: validated fits, fast and consistent failures, Ctrl-C, quiet logs."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from replaceme_jax import checkpointing, progress
from replaceme_jax.cli import main
from replaceme_jax.data import split_heldout
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.replaceme import pipeline
from replaceme_jax.replaceme.pipeline import compress
from replaceme_jax.report import StageTimer
from tests.helpers import make_model
from tests.test_replaceme import run_config, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_run")
    make_model(root / "m", "llama", num_hidden_layers=6, max_position_embeddings=512)
    return root / "m"


def write_yaml(path, **values):
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


# --- held-out validation -------------------------------------------------------------------------

def test_heldout_split_takes_whole_documents_with_a_floor():
    docs = [np.full(i + 1, i) for i in range(40)]
    fit, held = split_heldout(docs, 0.15, 4, seed=0)
    assert len(held) == 6 and len(fit) == 34
    # whole documents, none split or lost, fit keeps the original order
    assert sorted(int(d[0]) for d in fit + held) == list(range(40))
    assert all(len(d) == int(d[0]) + 1 for d in fit + held)
    assert [int(d[0]) for d in fit] == sorted(int(d[0]) for d in fit)
    assert len(split_heldout(docs[:10], 0.15, 4)[1]) == 4  # the floor
    assert split_heldout(docs, 0.0, 4) == (docs, [])
    with pytest.raises(ReplaceMeError, match="too little calibration data to validate"):
        split_heldout(docs[:7], 0.15, 4)


def test_auto_fit_records_its_choices_and_picks_the_lowest_heldout_perplexity(tmp_path, model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="replaceme_jax"):
        result = compress(run_config(tmp_path, model_dir, layers_to_skip=2))
    block = result.report["block_results"][0]
    validation = block["validation"]
    assert validation["heldout_sequences"] >= 4
    for key in ("perplexity_original", "perplexity_without_T", "perplexity_with_T"):
        assert np.isfinite(validation[key]) and validation[key] > 1
    tried = [c for c in validation["candidates"] if "perplexity" in c]
    assert len(tried) >= 4  # a search, not one point
    best_fit = min(c["perplexity"] for c in tried)
    refined = block["solver"].get("refine")  # the default refines the best fit; kept only if it scores better
    assert refined is not None and refined["perplexity_before"] == best_fit
    assert validation["perplexity_with_T"] == (refined["perplexity_after"] if refined["kept"] else best_fit)
    assert validation["perplexity_with_T"] <= best_fit
    # the search is not silent: one log line per fit scored
    assert len([r for r in caplog.records if r.getMessage().startswith("held-out search: fit ")]) == len(tried)
    chosen = block["solver"]
    assert chosen["alpha_relative"] in pipeline.RELATIVE_ALPHAS
    assert chosen["first_token_weight"] in pipeline.FIRST_TOKEN_WEIGHTS
    for key in ("heldout_error_without_T_rest", "heldout_error_without_T_first", "heldout_error_with_T_rest",
                "heldout_error_with_T_first"):
        assert np.isfinite(validation[key]) and validation[key] >= 0
    for c in tried:  # closed-form held-out errors of every candidate, ordinary and first-position rows
        assert c["heldout_error_rest"] >= 0 and c["heldout_error_first"] >= 0
    if validation["T_beats_dropping"]:
        assert validation["perplexity_with_T"] <= validation["perplexity_without_T"]


def _sabotage_solver(monkeypatch):
    """Every lstsq candidate becomes a map that points the MLP branch the wrong way."""
    solve = pipeline.LstsqFamily.solve

    def bad(self, w, alpha):
        T, info = solve(self, w, alpha)
        return (None if T is None else -8.0 * T), info
    monkeypatch.setattr(pipeline.LstsqFamily, "solve", bad)


def test_a_T_worse_than_dropping_falls_back_to_uidl_with_one_warning(tmp_path, model_dir, monkeypatch, caplog):
    (tmp_path / "u").mkdir()
    uidl = compress(run_config(tmp_path / "u", model_dir, method="uidl", save_path=str(tmp_path / "uidl")))
    _sabotage_solver(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="replaceme_jax"):  # on the block UIDL drops
        result = compress(run_config(tmp_path, model_dir, block_choice="distance"))
    warnings = [r for r in caplog.records if "does not beat dropping" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    validation = result.report["block_results"][0]["validation"]
    assert validation["fallback"] is True and validation["T_beats_dropping"] is False
    assert validation["perplexity_with_T"] > validation["perplexity_without_T"]
    assert result.report["blocks"] == uidl.report["blocks"]
    ours, dropped = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(
        str(tmp_path / "uidl" / "model.safetensors"))
    assert ours.keys() == dropped.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], dropped[name], err_msg=name)


def test_fallback_none_keeps_the_worse_T_but_still_warns(tmp_path, model_dir, monkeypatch, caplog):
    _sabotage_solver(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="replaceme_jax"):
        result = compress(run_config(tmp_path, model_dir, fallback="none", block_choice="distance"))
    assert any("does not beat dropping" in r.getMessage() for r in caplog.records)
    block = result.report["block_results"][0]
    assert block["validation"]["fallback"] is False and block["relative_error_with_T"] is not None


# --- fail fast, same exit codes ------------------------------------------------------------------

def test_a_missing_dataset_fails_before_the_model_is_loaded(tmp_path, model_dir, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data files were checked")
    monkeypatch.setattr(pipeline, "load_model", no_load)
    config = write_yaml(tmp_path / "c.yaml", model_path=str(model_dir), dataset=str(tmp_path / "nope.jsonl"),
                        save_path=str(tmp_path / "out"))
    began = time.perf_counter()
    assert main(["compress", "--config", str(config)]) == 1
    assert time.perf_counter() - began < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0]
    assert not (tmp_path / "out").exists()


def _commands_into(tmp_path, model_dir, out):
    data = write_corpus(tmp_path / "d.jsonl")
    compress_yaml = write_yaml(tmp_path / "c.yaml", model_path=str(model_dir), dataset=str(data),
                               save_path=str(out), dataset_size=48, max_length=48, layers_to_skip=1)
    return {
        "convert": ["convert", str(model_dir), str(out)],
        "compress": ["compress", "--config", str(compress_yaml)],
        "evaluate": ["evaluate", "--model", str(model_dir), "--tasks", "wikitext2", "--output", str(out)],
    }


def test_an_existing_output_is_exit_2_in_every_command(tmp_path, model_dir, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for name, argv in _commands_into(tmp_path, model_dir, out).items():
        if name == "evaluate":
            continue  # evaluate writes one report file, replaced like any output file
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "exists" in err and "--overwrite" in err, name
        assert (out / "keep.txt").read_text() == "mine"


def test_a_missing_model_is_exit_1_in_every_command(tmp_path, capsys):
    missing = tmp_path / "no_model"
    for name, argv in _commands_into(tmp_path, missing, tmp_path / "out").items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no_model" in err[0], (name, err)
        assert not (tmp_path / "out").exists()


def test_evaluate_checks_every_model_before_scoring_any(tmp_path, model_dir, monkeypatch, capsys):
    from replaceme_jax import conversion

    def no_scoring(*a, **k):
        raise AssertionError("loaded a model before checking all of them")
    monkeypatch.setattr(conversion, "load_model", no_scoring)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    assert main(["evaluate", "--model", str(model_dir), "--model", str(broken), "--tasks", "wikitext2"]) == 1
    assert "broken" in capsys.readouterr().err


def test_a_mistyped_key_gets_did_you_mean(tmp_path, model_dir, capsys):
    config = write_yaml(tmp_path / "c.yaml", model_path=str(model_dir), layer_to_skip=2)
    assert main(["compress", "--config", str(config)]) == 2
    assert "did you mean 'layers_to_skip'" in capsys.readouterr().err
    assert main(["compress", "--config", str(config), "--set", "datset=x"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_removing_more_than_half_the_layers_warns_once(tmp_path, model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="replaceme_jax"):
        compress(run_config(tmp_path, model_dir, layers_to_skip=4, method="uidl"))
    lines = [r.getMessage() for r in caplog.records if "removing 4 of 6 layers" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


# --- honest logs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("exception,word", [(None, "done"), (ValueError, "failed"), (KeyboardInterrupt, "interrupted")])
def test_stage_log_says_how_the_stage_ended(caplog, exception, word):
    timer = StageTimer()
    with caplog.at_level(logging.INFO, logger="replaceme_jax"):
        try:
            with timer("pass1"):
                if exception is not None:
                    raise exception()
        except (ValueError, KeyboardInterrupt):
            pass
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage pass1 ") and "after" in
            r.getMessage()]
    assert len(ends) == 1 and ends[0].startswith(f"stage pass1 {word} after")


def test_progress_without_a_terminal_logs_lines_not_carriage_returns(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="replaceme_jax"):
        with progress.progress_bar(200, "scoring", unit="batch") as bar:  # pytest's stderr is not a tty
            for _ in range(200):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records if "scoring" in r.getMessage()]
    assert 5 <= len(lines) <= 12 and "200/200" in lines[-1]
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out


def test_auto_checkpointing_spends_at_most_5_percent_of_a_pass_saving(monkeypatch, tmp_path):
    clock = [0.0]
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: clock[0])
    state = checkpointing.PassState(tmp_path / "ckpt", "auto")
    saving = 0.0
    for batch in range(1, 20001):
        clock[0] += 0.5  # a batch
        if state.due(batch):
            # a save that takes 4 s, as a large orbax write might
            state.last_save_seconds, saving = 4.0, saving + 4.0
            clock[0] += 4.0
            state.last_save_end = clock[0]
    assert 0 < saving / clock[0] < 0.05


# --- Ctrl-C --------------------------------------------------------------------------------------

def _interrupt_when(argv, marker: str, tmp_path, timeout=240):
    """Start the CLI, send SIGINT once ``marker`` shows on stderr, return (rc, seconds to exit, stderr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # A runner started with `&` in a shell without job control (CI harnesses, nohup scripts) passes
    # SIGINT on as ignored, and Python then installs no KeyboardInterrupt handler: the child installs
    # it itself, as Python does for a terminal's foreground job (no preexec_fn: not fork-safe with threads).
    launch = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "runpy.run_module('replaceme_jax.cli', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", launch, *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            raise AssertionError("the run ended before " + repr(marker) + ":\n" + "".join(seen))
        time.sleep(0.5)  # well inside the stage
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        return rc, time.monotonic() - sent, "".join(seen) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("stage,marker", [("generation", "sampling calibration text"), ("pass1", "stage pass1_distances")])
def test_ctrl_c_stops_within_2_s_with_exit_130_and_no_output(tmp_path, model_dir, stage, marker):
    out = tmp_path / "out"
    if stage == "generation":
        data = dict(dataset="self", dataset_size=4000, max_length=256, self_batch_size=4)
    else:
        data = dict(dataset=str(write_corpus(tmp_path / "d.jsonl", rows=4000, min_words=30, max_words=60)),
                    dataset_size=4000, max_length=64, batch_size=2)
    config = write_yaml(tmp_path / "c.yaml", model_path=str(model_dir), save_path=str(out), layers_to_skip=1,
                        **data)
    rc, seconds, err = _interrupt_when(["compress", "--config", str(config)], marker, tmp_path)
    assert rc == 130, err
    assert seconds < 2.0, (seconds, err)
    assert err.strip().splitlines()[-1] == "replaceme-jax: interrupted"
    assert not out.exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())


def test_checkpoint_saves_print_no_orbax_chatter(tmp_path, model_dir):
    config = write_yaml(tmp_path / "c.yaml", model_path=str(model_dir), save_path=str(tmp_path / "out"),
                        dataset=str(write_corpus(tmp_path / "d.jsonl")), dataset_size=48, max_length=48,
                        batch_size=8, layers_to_skip=1, checkpoint_every=1, fallback="none")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "replaceme_jax.cli", "compress", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    noisy = [line for line in proc.stderr.splitlines() if "absl" in line or "orbax" in line.lower()]
    assert not noisy, noisy[:5]


def test_perplexity_chart_uses_a_log_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from replaceme_jax.evaluation import plot_report

    saved = []
    original_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original_savefig(self, *a, **k)))
    report = {"models": {name: {"results": {"wikitext2": {"perplexity": ppl, "n": 8},
                                            "arc_easy": {"acc": 0.4, "acc_norm": 0.45, "n": 8}}}
                         for name, ppl in (("original", 29.5), ("pruned", 458788.0))}}
    plot_report(report, tmp_path / "chart.png")
    (figure,) = saved
    scales = {ax.get_title(): ax.get_yscale() for ax in figure.axes}
    assert scales == {"accuracy": "linear", "perplexity (lower is better)": "log"}
    assert (tmp_path / "chart.png").stat().st_size > 0
