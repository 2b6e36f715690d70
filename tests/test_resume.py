"""Resumable runs: kill -9 in the middle of a compress run, rerun, get the bitwise same T."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from replaceme_jax.cli import main
from tests.helpers import make_model
from tests.test_replaceme import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def compress_args(tmp_path, out, *extra):
    return ["compress", "--set", f"model_path={tmp_path / 'm'}", "--set", f"dataset={tmp_path / 'd.jsonl'}",
            "--set", "layers_to_skip=2", "--set", "max_length=48", "--set", "batch_size=4",
            "--set", "dataset_size=64", "--set", "num_A=2", "--set", "merge_consecutive=false",
            "--set", f"save_path={out}", "--set", "checkpoint_every=1", "--set", "fallback=none", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    make_model(tmp_path / "m", "llama", num_hidden_layers=6)
    write_corpus(tmp_path / "d.jsonl", rows=64)
    assert main(compress_args(tmp_path, tmp_path / "clean") + ["-q"]) == 0
    return tmp_path, load_file(str(tmp_path / "clean" / "replaceme" / "transforms.safetensors"))


def wait_for_checkpoint(state_dir: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(state_dir.glob("pass1/*")) and any(p.name.isdigit() for p in (state_dir / "pass1").iterdir()):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("delay", [0.0, 0.7, 1.5])
def test_kill_9_and_resume_gives_bitwise_identical_T(setup, delay):
    tmp_path, clean = setup
    out = tmp_path / f"killed_{delay}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "replaceme_jax.cli", *compress_args(tmp_path, out), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = wait_for_checkpoint(out / ".state", proc)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert started
    assert not (out / "config.json").exists() or proc.returncode == 0  # no partial model
    assert main(compress_args(tmp_path, out) + ["-q"]) == 0
    resumed = load_file(str(out / "replaceme" / "transforms.safetensors"))
    assert sorted(resumed) == sorted(clean)
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key])
    assert not (out / ".state").exists()


def test_changed_config_refuses_to_resume_and_restart_discards(setup, capsys):
    tmp_path, clean = setup
    out = tmp_path / "changed"
    state = out / ".state"
    state.mkdir(parents=True)
    from replaceme_jax.checkpointing import RunState
    from replaceme_jax.config import CompressConfig, to_dict

    cfg = CompressConfig(alpha=0.5)
    first = RunState(out, to_dict(cfg), {"path": "x"}, every=1)
    assert not (state / "meta.json").exists()  # nothing is written before the first save
    first.ensure()
    with pytest.raises(Exception, match="config field 'alpha' differs"):
        RunState(out, to_dict(CompressConfig(alpha=0.0)), {"path": "x"}, every=1)
    with pytest.raises(Exception, match="model"):
        RunState(out, to_dict(cfg), {"path": "y"}, every=1)
    RunState(out, to_dict(CompressConfig(alpha=0.0)), {"path": "x"}, every=1, restart=True).ensure()
    meta = json.loads((state / "meta.json").read_text())
    assert meta["config"]["alpha"] == 0.0


def test_cosine_solver_resumes_from_an_epoch_state():
    from replaceme_jax.replaceme.solvers import fit_cosine

    rng = np.random.default_rng(0)
    M = rng.standard_normal((2048, 8)).astype(np.float32)
    target = M @ (np.eye(8) + 0.3 * rng.standard_normal((8, 8)))
    states = []
    full = fit_cosine(M, target, lr=1e-2, epochs=4, batch_rows=256, on_epoch=states.append)
    resumed = fit_cosine(M, target, lr=1e-2, epochs=4, batch_rows=256, resume=states[1])
    np.testing.assert_array_equal(resumed.T, full.T)
    assert resumed.losses == full.losses


def test_cosine_run_resumes_after_kill(setup):
    tmp_path, _ = setup
    extra = ["--set", "method=cosine", "--set", "num_A=1", "--set", "cosine_epochs=60",
             "--set", "cosine_batch_rows=64"]
    assert main(compress_args(tmp_path, tmp_path / "cos_clean", *extra) + ["-q"]) == 0
    clean = load_file(str(tmp_path / "cos_clean" / "replaceme" / "transforms.safetensors"))
    out = tmp_path / "cos_killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "replaceme_jax.cli", *compress_args(tmp_path, out, *extra), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any((out / ".state").glob("cosine_0/[0-9]*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "config.json").exists()
    assert main(compress_args(tmp_path, out, *extra) + ["-q"]) == 0
    resumed = load_file(str(out / "replaceme" / "transforms.safetensors"))
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key])


def test_processes_that_find_different_states_stop_with_an_error(tmp_path, monkeypatch):
    """With several processes every one reads the state; one that finds another step (a state directory
    not on shared storage) must stop the run, not let the collectives fall out of step."""
    from replaceme_jax import checkpointing
    from replaceme_jax.errors import ReplaceMeError

    checkpointing.PassState(tmp_path / "pass1", every=1).save(3, {"x": np.arange(4.0)})
    assert checkpointing.PassState(tmp_path / "pass1", every=1).restore({"x": np.zeros(4)})[0] == 3
    # process 1 (simulated) found nothing where process 0 found step 3
    monkeypatch.setattr(checkpointing, "all_processes", lambda values: np.array([list(values), [-1]]))
    with pytest.raises(ReplaceMeError, match=r"process 0: step 3, process 1: none\).*shared file system"):
        checkpointing.PassState(tmp_path / "pass1", every=1).restore({"x": np.zeros(4)})
    monkeypatch.undo()
    run = checkpointing.RunState(tmp_path, {}, {"path": "x"}, every=1)
    # process 1 (simulated) finds block 0 finished where process 0 finds nothing
    monkeypatch.setattr(checkpointing, "all_processes", lambda values: np.array([list(values), [0]]))
    with pytest.raises(ReplaceMeError, match=r"block 0 \(process 0: none, process 1: present\)"):
        run.load_block(0)


def test_state_is_built_only_when_a_save_is_due_and_distributed_keys_do_not_block_resume(tmp_path):
    from replaceme_jax import checkpointing

    built = []
    state = checkpointing.PassState(tmp_path / "p", every=2)
    state.save(1, lambda: built.append(1) or {"x": np.ones(2)})
    assert built == [] and not (tmp_path / "p").exists()
    state.save(2, lambda: built.append(2) or {"x": np.ones(2)})
    assert built == [2] and state.restore({"x": np.zeros(2)})[0] == 2
    first = checkpointing.RunState(tmp_path, {"alpha": 0.0, "distributed": {"process_id": 0}}, {"path": "x"}, every=1)
    first.ensure()
    # the other process of the same job, or a rerun with a new coordinator port
    checkpointing.RunState(tmp_path, {"alpha": 0.0, "distributed": {"process_id": 1}}, {"path": "x"}, every=1)
