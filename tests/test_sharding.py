"""Sharded capture equals the single-device result: 8 simulated CPU devices, and 2 processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jax.sharding import PartitionSpec as P

from replaceme_jax.sharding import ShardingRules, make_mesh, mesh_shape
from replaceme_jax.errors import UsageError
from replaceme_jax.models.common import ParamSpec
from tests.helpers import devices_env, make_model, random_batch, torch_logits
from tests.test_replaceme import write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "compress_on_mesh.py"


def run_on_devices(config: dict | list[dict], devices: int, env_extra=None, timeout=600) -> list[dict]:
    """compress for each config, one after another in one process on ``devices`` CPU devices; each run's result."""
    env = dict(devices_env(devices), **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(config)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tagged(proc.stdout, "RESULT")


# The tests on `tiny` share one worker under `--dist loadgroup` (pyproject addopts), so its single-device
# reference run happens once, not once per xdist worker.
TINY_GROUP = pytest.mark.xdist_group("tiny_mesh")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    make_model(root / "m", "llama", num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)
    write_corpus(root / "data.jsonl", rows=32)
    base = dict(model_path=str(root / "m"), dataset=str(root / "data.jsonl"), max_length=32, batch_size=8,
                dataset_size=32, layers_to_skip=2, overwrite=True, fallback="none")
    [single] = run_on_devices(dict(base, save_path=str(root / "single")), 1)
    return root, base, single


MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 4, "tensor": 2}, {"fsdp": 2, "tensor": 4}]


# Sums over 8 devices are reduced in a different order than on one: float32 per-batch products
# (relative ~1e-7) accumulate into a T of norm ~1 conditioned ~1e2, so 1e-5 is ample and still tight.
@TINY_GROUP
def test_sharded_compress_equals_single_device(tiny):
    """Every mesh layout in one 8-device process (one start-up instead of four)."""
    root, base, single = tiny
    names = ["_".join(f"{k}{v}" for k, v in mesh.items()) for mesh in MESHES]
    runs = run_on_devices([dict(base, mesh=mesh, save_path=str(root / name)) for mesh, name in zip(MESHES, names)], 8)
    assert len(runs) == len(MESHES)
    b = AutoModelForCausalLM.from_pretrained(root / "single", dtype=torch.float32)
    ids, mask = random_batch(128, [12, 7], seed=0)
    for mesh, name, sharded in zip(MESHES, names, runs):
        assert sharded["devices"] == 8 and sharded["mesh"] == mesh_shape(mesh, 8), name
        assert sharded["blocks"] == single["blocks"], name
        for start, d in single["distances"].items():
            assert sharded["distances"][start] == pytest.approx(d, abs=1e-6), name
        np.testing.assert_allclose(np.array(sharded["T"][0]), np.array(single["T"][0]), atol=1e-5, err_msg=name)
        a = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32)
        np.testing.assert_allclose(torch_logits(a, ids, mask), torch_logits(b, ids, mask), atol=1e-4, err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@TINY_GROUP
def test_two_processes_with_jax_distributed_give_the_same_T(tiny):
    root, base, single = tiny
    port = free_port()
    procs = []
    for pid in range(2):
        config = dict(base, save_path=str(root / "multi"), distributed={
            "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid})
        env = devices_env(4)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(config)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads([l for l in outputs[0][0].splitlines() if l.startswith("RESULT ")][-1][7:])
    assert result["processes"] == 2 and result["devices"] == 8
    assert result["blocks"] == single["blocks"]
    np.testing.assert_allclose(np.array(result["T"][0]), np.array(single["T"][0]), atol=1e-5)
    assert (root / "multi" / "config.json").is_file()


def test_mesh_shape_and_rules():
    assert mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape({"tensor": 2, "data": -1}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(UsageError, match="needs 6 devices"):
        mesh_shape({"data": 3, "tensor": 2}, 8)
    with pytest.raises(UsageError, match="unknown axis 'model'"):
        mesh_shape({"model": 2}, 8)
    mesh = make_mesh(None)
    spec = ParamSpec((32, 64), ("embed", "mlp"))
    assert ShardingRules().partition_spec(spec, mesh) == ShardingRules().partition_spec(spec, mesh)


CRASH_SCRIPT = ROOT / "tests" / "scripts" / "compress_crash_on_mesh.py"


def run_two_processes(config: dict, *extra: str, timeout=300) -> list[tuple[int, str, str]]:
    """Both processes of a 2-process jax.distributed job (4 CPU devices each); (returncode, stdout, stderr)."""
    port = free_port()
    env = devices_env(4)
    procs = [subprocess.Popen([sys.executable, str(CRASH_SCRIPT), json.dumps(dict(config, distributed={
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid})), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def tagged(stdout: str, tag: str) -> list[dict]:
    return [json.loads(l[len(tag) + 1:]) for l in stdout.splitlines() if l.startswith(tag + " ")]


@TINY_GROUP
def test_two_processes_resume_from_the_same_batch(tiny):
    """A 2-process job dies after the pass-1 state of batch 2 is saved; the rerun of both processes
    restores batch 2 on each (not only on process 0), so their collectives stay in step, and gives
    the T of an uninterrupted single-device run."""
    root, base, single = tiny
    config = dict(base, save_path=str(root / "multi_resume"), checkpoint_every=1)
    crashed = run_two_processes(config, "pass1:2")
    assert crashed[0][0] == 75, crashed[0][2][-3000:]  # process 0 saved batch 2, then died
    assert not (root / "multi_resume" / "config.json").exists()
    resumed = run_two_processes(config)
    for code, out, err in resumed:
        assert code == 0, err[-3000:]
    restored = [r for _, out, _ in resumed for r in tagged(out, "RESTORED") if r["pass"] == "pass1"]
    assert sorted((r["process"], r["step"]) for r in restored) == [(0, 2), (1, 2)]
    result = tagged(resumed[0][1], "RESULT")[-1]
    assert result["processes"] == 2 and result["blocks"] == single["blocks"]
    # as test_sharding's other multi-device comparisons: sums reduced in another order, float32 per batch
    np.testing.assert_allclose(np.array(result["T"][0]), np.array(single["T"][0]), atol=1e-5)
    assert not (root / "multi_resume" / ".state").exists()


def run_experts_on_devices(configs: list[dict], devices: int) -> list[dict]:
    env = devices_env(devices)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "experts_on_mesh.py"), json.dumps(configs)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tagged(proc.stdout, "RESULT")[-1]


def test_experts_on_a_mesh_keep_and_merge_as_on_one_device(tmp_path):
    """`experts` with `mesh`: calibration batches split over data x fsdp, layers sharded over fsdp x
    tensor; REAP (one pass) and REAM (sequential: the streams advance through the merged layer) keep
    and merge the same experts as on one device."""
    from tests.helpers import WORDS
    from tests.moe_helpers import MOE_CONFIGS, make_moe_model

    model_type, overrides = MOE_CONFIGS["qwen2_moe_shared"]
    make_moe_model(tmp_path / "model", model_type, tokenizer=True, **overrides)
    rng = np.random.default_rng(0)
    with open(tmp_path / "calib.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 30)))}) + "\n")
    base = dict(model_path=str(tmp_path / "model"), dataset=str(tmp_path / "calib.jsonl"), dataset_size=16,
                batch_size=8, max_length=32, compression_ratio=0.5, overwrite=True)
    configs = [dict(base, method=m, save_path=str(tmp_path / m)) for m in ("reap", "ream")]
    single = run_experts_on_devices(configs, 1)
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    sharded = run_experts_on_devices([dict(c, mesh=mesh, save_path=c["save_path"] + "_mesh") for c in configs], 8)
    for one, many in zip(single, sharded):
        assert many["mesh"] == mesh and many["devices"] == 8
        for a, b in zip(one["layers"], many["layers"]):
            assert a["kept"] == b["kept"] and a.get("groups") == b.get("groups") and a["tokens"] == b["tokens"]
            # float32 sums over tokens reduced in another order: relative ~1e-6 per sum
            assert b["reconstruction_error"] == pytest.approx(a["reconstruction_error"], rel=1e-4)
        for a, b in zip(one["saliency"], many["saliency"]):
            for method in a:
                np.testing.assert_allclose(b[method], a[method], rtol=1e-5)


def shard_tiny(mesh: dict, **config) -> dict:
    env = devices_env(8)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "replication_on_mesh.py"),
                           json.dumps({"mesh": mesh, "config": config})], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tagged(proc.stdout, "RESULT")[-1]


def test_mesh_comes_from_jax_make_mesh_with_auto_axes():
    out = shard_tiny({"fsdp": 2, "tensor": 4})
    assert out["device_order"] == out["make_mesh_order"]  # the topology-aware order
    assert out["axis_types"] == ["Auto", "Auto", "Auto"]  # not make_mesh's default Explicit
    assert out["specs"]["layers.0.mlp.up_proj.kernel"] == ["fsdp", "tensor"]
    assert not [r for r in out["records"] if r["level"] == "WARNING"] and out["strict"] is None


def test_replication_is_one_warning_naming_the_parameters_or_refused_when_strict():
    # vocab 130 and kv_heads x head_dim = 1 x 6 do not divide tensor = 4; q_heads (4 x 6 = 24) does.
    out = shard_tiny({"fsdp": 2, "tensor": 4}, vocab_size=130, num_key_value_heads=1, head_dim=6)
    warnings = [r["message"] for r in out["records"] if r["level"] == "WARNING"]
    assert len(warnings) == 1, warnings  # one summary for the whole model, not one line per tensor
    message = warnings[0]
    assert "8 tensor dim(s) stay replicated" in message
    assert "'vocab' (size 130) -> tensor, not divisible by tensor=4: 2 tensor(s): embed_tokens.embedding, " \
           "lm_head.kernel" in message
    assert "'kv_heads' (size 6) -> tensor, not divisible by tensor=4: 6 tensor(s): " \
           "layers.*.self_attn.k_proj.kernel, layers.*.self_attn.v_proj.kernel" in message
    assert out["specs"]["embed_tokens.embedding"] == [None, "fsdp"]
    assert out["specs"]["layers.2.self_attn.k_proj.kernel"] == ["fsdp", None]
    assert out["specs"]["layers.2.self_attn.q_proj.kernel"] == ["fsdp", "tensor"]
    assert out["strict"].startswith("sharding: cannot shard as the rules ask")
    assert "'kv_heads' (size 6)" in out["strict"]


def test_rules_report_a_mesh_axis_used_twice_in_one_array():
    from jax.sharding import AbstractMesh, AxisType

    rules = ShardingRules(rules=(("embed", "tensor"), ("mlp", "tensor")))
    mesh = AbstractMesh((1, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = {"up": ParamSpec((32, 64), ("embed", "mlp")), "norm": ParamSpec((32,), ("norm",))}
    assert rules.partition_spec(specs["up"], mesh) == P("tensor", None)
    [found] = rules.replicated(specs, mesh)
    assert (found.path, found.logical, found.mesh_axis, found.reason) == ("up", "mlp", "tensor", "reused")


def test_orbax_restore_puts_each_shard_on_its_device(tmp_path):
    """An orbax checkpoint restored onto a mesh comes back already sharded (each device reads its own
    part) with the shardings and values the streaming HF loader gives on the same mesh."""
    from replaceme_jax.conversion import load_model, save_orbax
    from replaceme_jax.conversion.weight_map import flatten_params

    make_model(tmp_path / "hf", "llama", num_attention_heads=4, num_key_value_heads=2)
    model = load_model(tmp_path / "hf")
    save_orbax(model, tmp_path / "ckpt")
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    env = devices_env(8)
    sources = [str(tmp_path / "ckpt"), str(tmp_path / "hf")]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "orbax_restore_on_mesh.py"),
                           json.dumps(sources), json.dumps(mesh)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored, streamed = (tagged(proc.stdout, "RESULT")[-1][s] for s in sources)
    single = flatten_params(model.params)
    assert set(restored) == set(streamed) == set(single)
    split = 0
    for path, leaf in restored.items():
        assert leaf["mesh"] == mesh and leaf["spec"] == streamed[path]["spec"], path
        assert leaf["shard"] == streamed[path]["shard"], path
        assert leaf["sum"] == pytest.approx(float(np.asarray(single[path], np.float64).sum()), abs=1e-9), path
        split += leaf["shard"] != list(np.shape(single[path]))
    assert split >= len(restored) // 2  # most tensors are really split, not replicated
