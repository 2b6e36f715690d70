"""Run configs: `compress` and `experts` share their sections (run, data, mesh), so a key means the same
and is checked the same in both; flat keys (the reference tool's) and nested sections load alike."""

import dataclasses
import typing

import pytest
import yaml

from replaceme_jax.config import CompressConfig, DataConfig, MeshConfig, RunConfig, from_dict, load_config
from replaceme_jax.errors import UsageError
from replaceme_jax.experts.config import ExpertsConfig

SHARED = (RunConfig, DataConfig, MeshConfig)
# the least each command needs besides the key under test
BASE = {CompressConfig: {}, ExpertsConfig: {"model_path": "m", "save_path": "out", "dataset": "self", "num_experts": 2}}


def names(cls):
    return [f.name for f in dataclasses.fields(cls)]


def write(path, content):
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_shared_keys_have_one_type_in_both_commands():
    for section in SHARED:
        hints = typing.get_type_hints(section)
        for command in (CompressConfig, ExpertsConfig):
            assert issubclass(command, section)
            command_hints = typing.get_type_hints(command)
            # a command may give a shared key another default, never another type
            assert {n: command_hints[n] for n in names(section)} == {n: hints[n] for n in names(section)}, command


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "config key 'batch_size' must be >= 1 (got 0)"),
    ("dataset_size", -1, "config key 'dataset_size' must be >= 1 (got -1)"),
    ("max_length", 0, "config key 'max_length' must be >= 1 (got 0)"),
    ("self_batch_size", 0, "config key 'self_batch_size' must be >= 1 (got 0)"),
    ("self_top_k", 0, "config key 'self_top_k' must be >= 1 (got 0)"),
    ("self_top_p", 1.5, "config key 'self_top_p' must be in (0, 1]"),
    ("self_temperature", -0.1, "config key 'self_temperature' must be >= 0"),
    ("bucket", 0, "config key 'bucket' must be pow2, longest or a length >= 1"),
    ("bucket", "pow3", "config key 'bucket'"),
    ("chat_format", "alpaca", "config key 'chat_format' must be one of"),
    ("dataset", [{"dataset": "a.jsonl", "ratio": 0}], "'dataset[0]': 'ratio' must be a positive number"),
    ("mesh", {"data": "four"}, "config key 'mesh': 'data' must be an axis name with a size >= 1 or -1"),
    ("mesh", {"data": 0}, "config key 'mesh'"),
    ("seed", 1.5, "config key 'seed' must be an integer"),
    ("dtype", 16, "config key 'dtype' must be a string"),
])
def test_a_bad_shared_key_is_refused_alike_by_both_commands(key, value, message):
    for command in (CompressConfig, ExpertsConfig):
        with pytest.raises(UsageError) as e:
            from_dict(command, {**BASE[command], key: value})
        assert message in str(e.value), command


def test_good_shared_values_load_in_both_commands():
    raw = {"dataset": "self", "batch_size": 4, "bucket": 64, "sort_by_length": False, "mesh": {"data": -1, "tensor": 2},
           "seed": 3, "self_top_k": 5}
    for command in (CompressConfig, ExpertsConfig):
        cfg = from_dict(command, {**BASE[command], **raw})
        assert (cfg.bucket, cfg.sort_by_length, cfg.mesh, cfg.seed, cfg.self_top_k) == (64, False, raw["mesh"], 3, 5)


def test_the_commands_differ_in_defaults_only_where_they_say_so():
    compress, experts = CompressConfig(), ExpertsConfig()
    differ = sorted(n for s in SHARED for n in names(s) if getattr(compress, n) != getattr(experts, n))
    assert differ == ["dataset", "dataset_size", "max_length", "model_path", "save_path"]
    with pytest.raises(UsageError, match="config key 'save_path' is required"):
        from_dict(ExpertsConfig, {"model_path": "m", "dataset": "self", "num_experts": 2})
    with pytest.raises(UsageError, match="config key 'dataset' is required"):
        from_dict(ExpertsConfig, {"model_path": "m", "save_path": "out", "num_experts": 2})
    # an experts run that re-applies a recipe needs no data
    assert from_dict(ExpertsConfig, {"model_path": "m", "save_path": "out", "num_experts": 2,
                                     "recipe_path": "r.json"}).dataset == ""


FLAT = {"method": "lstsq", "model_path": "m", "dataset": "c4.jsonl", "dataset_size": 32, "batch_size": 4,
        "layers_to_skip": 2, "alpha": 0.5, "mesh": {"data": 2}, "save_path": "out"}
NESTED = {"model_path": "m", "save_path": "out", "mesh": {"data": 2},
          "data": {"dataset": "c4.jsonl", "dataset_size": 32, "batch_size": 4},
          "solver": {"method": "lstsq", "layers_to_skip": 2, "alpha": 0.5}}


def test_nested_sections_load_like_flat_keys(tmp_path):
    assert load_config(CompressConfig, write(tmp_path / "n.yaml", NESTED)) == \
        load_config(CompressConfig, write(tmp_path / "f.yaml", FLAT))
    experts = {"model_path": "m", "save_path": "out", "data": {"dataset": "self", "max_length": 64},
               "solver": {"method": "ream", "num_experts": 2, "group_size": 4}}
    cfg = load_config(ExpertsConfig, write(tmp_path / "e.yaml", experts))
    assert (cfg.dataset, cfg.max_length, cfg.method, cfg.num_experts, cfg.group_size) == ("self", 64, "ream", 2, 4)
    # the reference tool's own `solver: adam` stays a key of compress
    assert load_config(CompressConfig, write(tmp_path / "s.yaml", dict(FLAT, solver="adam"))).solver == "adam"


def test_overrides_address_keys_flat_or_by_section(tmp_path):
    path = write(tmp_path / "n.yaml", NESTED)
    cfg = load_config(CompressConfig, path, ["data.dataset_size=8", "batch_size=2", "solver.alpha=0.25"])
    assert (cfg.dataset_size, cfg.batch_size, cfg.alpha) == (8, 2, 0.25)
    cfg = load_config(CompressConfig, write(tmp_path / "f.yaml", FLAT), ["data={dataset_size: 16}"])
    assert cfg.dataset_size == 16


@pytest.mark.parametrize("raw,overrides,message", [
    (dict(NESTED, data={"datset": "x"}), [], "unknown config key 'datset' in section 'data' (did you mean 'dataset'?)"),
    (dict(NESTED, data={"alpha": 0.1}), [], "unknown config key 'alpha' in section 'data' (it belongs in section "
                                            "'solver')"),
    (dict(NESTED, data={"seed": 1}), [], "unknown config key 'seed' in section 'data' (it is a top-level key)"),
    (dict(FLAT, data={"dataset_size": 8}), [], "config key 'dataset_size' is given twice"),
    (dict(FLAT, data="c4.jsonl"), [], "config section 'data' must be a mapping"),
    (dict(FLAT, datset="x"), [], "unknown config key 'datset' (did you mean 'dataset'?)"),
    (FLAT, ["dta.dataset_size=3"], "no config section 'dta'"),
    (FLAT, ["data.layers_to_skip=3"], "unknown config key 'layers_to_skip' in section 'data' (it belongs in section "
                                      "'solver')"),
])
def test_misplaced_and_mistyped_keys_are_named(tmp_path, raw, overrides, message):
    with pytest.raises(UsageError) as e:
        load_config(CompressConfig, write(tmp_path / "c.yaml", raw), overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_experts_config_has_no_solver_string_key(tmp_path):
    raw = {"model_path": "m", "save_path": "out", "dataset": "self", "num_experts": 2, "solver": "adam"}
    with pytest.raises(UsageError, match="config section 'solver' must be a mapping"):
        from_dict(ExpertsConfig, raw)


def test_the_nested_example_in_the_readme_loads_like_its_flat_form():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Config files"):]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    flat = {k: v for k, v in example.items() if k not in ("data", "solver")} | example["data"] | example["solver"]
    assert from_dict(CompressConfig, example) == from_dict(CompressConfig, flat)


@pytest.mark.parametrize("raw,message", [
    ({"method": "lstsq", "cosine_l1": 1e-4}, "config key 'cosine_l1' applies to method cosine only"),
    ({"method": "cosine", "cosine_l1": -1.0}, "config key 'cosine_l1' must be >= 0 (got -1.0)"),
])
def test_cosine_l1_is_refused_where_it_would_be_ignored_or_meaningless(raw, message):
    with pytest.raises(UsageError) as e:
        from_dict(CompressConfig, {**BASE[CompressConfig], **raw})
    assert message in str(e.value)
    assert from_dict(CompressConfig, {**BASE[CompressConfig], "method": "cosine", "cosine_l1": 1e-4}).cosine_l1 == 1e-4


def test_every_shipped_config_file_loads_into_its_command():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for path in files:
        command = ExpertsConfig if path.name.startswith("moe_") else CompressConfig
        load_config(command, path, [])
