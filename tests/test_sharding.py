"""Sharded capture equals the single-device result: 8 simulated CPU devices, and 2 processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from replaceme_jax.sharding import ShardingRules, make_mesh, mesh_shape
from replaceme_jax.errors import UsageError
from replaceme_jax.models.common import ParamSpec
from tests.helpers import make_model, random_batch, torch_logits
from tests.test_replaceme import write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "compress_on_mesh.py"


def run_on_devices(config: dict, devices: int, env_extra=None, timeout=600) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(config)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[-1][len("RESULT "):]) if line else {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    make_model(root / "m", "llama", num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)
    write_corpus(root / "data.jsonl", rows=32)
    base = dict(model_path=str(root / "m"), dataset=str(root / "data.jsonl"), max_length=32, batch_size=8,
                dataset_size=32, layers_to_skip=2, overwrite=True, fallback="none")
    single = run_on_devices(dict(base, save_path=str(root / "single")), 1)
    return root, base, single


# Sums over 8 devices are reduced in a different order than on one: float32 per-batch products
# (relative ~1e-7) accumulate into a T of norm ~1 conditioned ~1e2, so 1e-5 is ample and still tight.
@pytest.mark.parametrize("mesh", [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 4, "tensor": 2},
                                  {"fsdp": 2, "tensor": 4}])
def test_sharded_compress_equals_single_device(tiny, mesh):
    root, base, single = tiny
    name = "_".join(f"{k}{v}" for k, v in mesh.items())
    sharded = run_on_devices(dict(base, mesh=mesh, save_path=str(root / name)), 8)
    assert sharded["devices"] == 8 and sharded["mesh"] == mesh_shape(mesh, 8)
    assert sharded["blocks"] == single["blocks"]
    for start, d in single["distances"].items():
        assert sharded["distances"][start] == pytest.approx(d, abs=1e-6)
    np.testing.assert_allclose(np.array(sharded["T"][0]), np.array(single["T"][0]), atol=1e-5)
    a = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(root / "single", dtype=torch.float32)
    ids, mask = random_batch(128, [12, 7], seed=0)
    np.testing.assert_allclose(torch_logits(a, ids, mask), torch_logits(b, ids, mask), atol=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_give_the_same_T(tiny):
    root, base, single = tiny
    port = free_port()
    procs = []
    for pid in range(2):
        config = dict(base, save_path=str(root / "multi"), distributed={
            "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid})
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT))
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
