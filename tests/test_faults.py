"""Fault injection: hostile configs, data, weights and output locations. Each case must fail with one
clear line and a known exit code, leave no partial output and leave the source untouched."""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from replaceme_jax.cli import main
from replaceme_jax.config import CompressConfig
from tests.helpers import make_model
from tests.test_replaceme import write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_model(root / "m", "llama", num_hidden_layers=4)
    write_corpus(root / "d.jsonl", rows=24)
    return root


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def run(capsys, root, out, *sets, config=None):
    args = ["compress", "-q", "--set", f"model_path={root / 'm'}", "--set", f"save_path={out}",
            "--set", f"dataset={root / 'd.jsonl'}", "--set", "layers_to_skip=1", "--set", "max_length=32"]
    if config is not None:
        args += ["--config", str(config)]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def error_line(err: str) -> str:
    """The error is the last stderr line (warnings logged earlier may precede it), never a traceback."""
    assert "Traceback" not in err, err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("replaceme-jax: error: "), err
    return last


def assert_clean_failure(code, err, out, expected_code, message):
    assert code == expected_code, err
    assert message in error_line(err), err
    assert not out.exists() or not any(p for p in out.iterdir() if p.name != ".state")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_malformed_yaml(model_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("method: lstsq\nlayers_to_skip: [1, 2\n")
    code, err = run(capsys, model_dir, tmp_path / "out", config=config)
    assert_clean_failure(code, err, tmp_path / "out", 2, "invalid YAML")


def test_yaml_that_is_not_a_mapping(model_dir, tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    code, err = run(capsys, model_dir, tmp_path / "out", config=config)
    assert_clean_failure(code, err, tmp_path / "out", 2, "must be a mapping")


WRONG_VALUES = {int: "[1]", float: "'abc'", bool: "'maybe'", str: "[1, 2]", dict: "7"}


def _wrong_value(annotation):
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "'not-a-choice'"
    if args:  # Optional/union: a list fits none of str, int, float, bool or dict members here
        return "{'x': [1]}" if dict not in args else "[1, 2]"
    return WRONG_VALUES[annotation]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(CompressConfig)])
def test_every_config_key_rejects_a_wrong_type(model_dir, tmp_path, capsys, field):
    annotation = typing.get_type_hints(CompressConfig)[field]
    code, err = run(capsys, model_dir, tmp_path / "out", f"{field}={_wrong_value(annotation)}")
    assert_clean_failure(code, err, tmp_path / "out", 2, f"'{field}'")


@pytest.mark.parametrize("setting,message", [
    ("batch_size=0", "'batch_size' must be >= 1"),
    ("alpha=-1", "'alpha' must be >= 0"),
    ("layers_to_skip=4", "must be smaller than the model's 4 layers"),
    ("use_4bit=true", "not supported"),
    ("dataset=[{dataset: a.jsonl, ratio: 0}]", "'dataset[0]': 'ratio' must be a positive number"),
])
def test_out_of_range_values(model_dir, tmp_path, capsys, setting, message):
    code, err = run(capsys, model_dir, tmp_path / "out", setting)
    assert_clean_failure(code, err, tmp_path / "out", 2, message)


def test_empty_dataset(model_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    code, err = run(capsys, model_dir, tmp_path / "out", f"dataset={tmp_path / 'empty.jsonl'}")
    assert code == 1 and "empty.jsonl" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_one_row_dataset_is_too_little_data(model_dir, tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "the city"}) + "\n")
    code, err = run(capsys, model_dir, tmp_path / "out", f"dataset={tmp_path / 'one.jsonl'}")
    assert_clean_failure(code, err, tmp_path / "out", 1, "too little calibration data")


def test_a_missing_mixture_source_is_named(model_dir, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"the city {i}"}) + "\n" for i in range(8)))
    mixture = json.dumps([{"dataset": str(tmp_path / "a.jsonl")}, {"dataset": str(tmp_path / "gone.jsonl")}])
    code, err = run(capsys, model_dir, tmp_path / "out", f"dataset={mixture}")
    assert_clean_failure(code, err, tmp_path / "out", 1, "gone.jsonl")


def test_missing_column(model_dir, tmp_path, capsys):
    code, err = run(capsys, model_dir, tmp_path / "out", "dataset_column=body")
    assert code == 1 and "body" in error_line(err)


def test_nan_weights_stop_the_run_naming_the_parameter(tmp_path, capsys):
    make_model(tmp_path / "m", "llama", num_hidden_layers=4, tokenizer=True)
    write_corpus(tmp_path / "d.jsonl", rows=24)
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 3] = np.inf
    save_file(tensors, str(path))
    before = snapshot(tmp_path / "m")
    code, err = run(capsys, tmp_path, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", 1, "layers.1.mlp.up_proj.kernel contains NaN or Inf")
    assert snapshot(tmp_path / "m") == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_location(model_dir, tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    code, err = run(capsys, model_dir, tmp_path / "ro" / "out")
    assert code == 1 and "not writable" in err


def test_read_only_output_location_as_root(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")  # a path under a regular file can never be created
    code, err = run(capsys, model_dir, tmp_path / "file" / "out")
    assert code == 1 and error_line(err)


def test_full_disk_during_export_leaves_no_partial_output(model_dir, tmp_path):
    """RLIMIT_FSIZE makes every write past 30 kB fail as on a full disk (EFBIG)."""
    out = tmp_path / "out"
    before = snapshot(model_dir / "m")
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000)); "
            "from replaceme_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["compress", "-q", "--set", f"model_path={model_dir / 'm'}", "--set", f"save_path={out}",
            "--set", f"dataset={model_dir / 'd.jsonl'}", "--set", "layers_to_skip=1", "--set", "max_length=32"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "File too large" in err, proc.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert snapshot(model_dir / "m") == before


def test_existing_different_output_is_kept_without_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, err = run(capsys, model_dir, out)
    assert code == 2 and "--overwrite" in err
    assert (out / "config.json").read_text() == "{}"


# --- property test -----------------------------------------------------------------------------------

configs = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["lstsq", "cosine", "uidl", "bogus"]),
    "layers_to_skip": st.integers(-1, 5),
    "num_A": st.integers(0, 3),
    "alpha": st.sampled_from([0, 0.1, -1, "x"]),
    "batch_size": st.integers(0, 5),
    "max_length": st.integers(-1, 40),
    "dataset_size": st.integers(0, 30),
    "merge_consecutive": st.booleans(),
    "diag": st.booleans(),
    "accurate": st.booleans(),
    "first_token_rows": st.sampled_from(["include", "exclude"]),
    "include_pad_rows": st.booleans(),
    "cosine_epochs": st.integers(0, 2),
    "cosine_batch_rows": st.sampled_from([0, 16, 64]),
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=configs)
def test_random_configs_succeed_or_fail_cleanly(model_dir, tmp_path, capsys, overrides):
    out = tmp_path / f"out_{abs(hash(json.dumps(overrides, sort_keys=True)))}"
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    code, err = run(capsys, model_dir, out, *sets)
    if code == 0:
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers < 4
    else:
        assert code in (1, 2) and error_line(err), err
        assert not out.exists()
