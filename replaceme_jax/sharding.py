"""Device meshes, logical-axis sharding rules and multi-host start-up.

Every parameter declares logical axis names (``ParamSpec.logical_axes``); a small rules table maps
them to mesh axes, so sharding a model over ``data`` x ``fsdp`` x ``tensor`` is a table, not a rewrite.
Calibration batches are split over ``data`` and ``fsdp`` (FSDP shards the batch as well as the
weights); statistics are sums over the batch, which XLA reduces across devices and hosts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from replaceme_jax.errors import UsageError
from replaceme_jax.models.common import ParamSpec, map_specs

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "experts": None,
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    rules: tuple[tuple[str, str | None], ...] = tuple(DEFAULT_RULES.items())

    def mesh_axis(self, logical: str | None) -> str | None:
        return dict(self.rules).get(logical) if logical is not None else None

    def partition_spec(self, spec: ParamSpec, mesh: Mesh) -> P:
        """Map logical axes to mesh axes; a dim not divisible by its mesh axis stays replicated."""
        used: set[str] = set()
        out = []
        for dim, logical in zip(spec.shape, spec.logical_axes):
            axis = self.mesh_axis(logical)
            if axis is None or mesh.shape.get(axis, 1) == 1 or axis in used or dim % mesh.shape[axis]:
                out.append(None)
                continue
            used.add(axis)  # one mesh axis at most once per array
            out.append(axis)
        return P(*out)


def mesh_shape(mesh_config: Mapping[str, int] | None, device_count: int) -> dict[str, int]:
    """Axis sizes from a config like ``{data: 4, tensor: 2}``; missing axes are 1, and by default every
    device goes on ``data``. A single ``-1`` takes whatever the other axes leave."""
    config = dict(mesh_config or {})
    unknown = sorted(set(config) - set(MESH_AXES))
    if unknown:
        raise UsageError(f"mesh: unknown axis {unknown[0]!r} (axes: {', '.join(MESH_AXES)})")
    if not config:
        return {"data": device_count, "fsdp": 1, "tensor": 1}
    sizes = {axis: int(config.get(axis, 1)) for axis in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise UsageError(f"mesh: invalid axis sizes {config}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if device_count % fixed:
            raise UsageError(f"mesh: {device_count} devices do not divide by {fixed}")
        sizes[free[0]] = device_count // fixed
    if int(np.prod(list(sizes.values()))) != device_count:
        raise UsageError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices; {device_count} present")
    return sizes


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    array = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(array, MESH_AXES)


def param_shardings(specs, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    return map_specs(lambda s: NamedSharding(mesh, rules.partition_spec(s, mesh)), specs)


def shard_params(params, specs, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, param_shardings(specs, mesh, rules))


def place_fn(mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """A loader hook that puts each tensor straight into its sharded device array (no full copy per
    device; on several hosts each host fills only its own shards)."""

    def place(path: str, spec: ParamSpec, array: np.ndarray) -> jax.Array:
        sharding = NamedSharding(mesh, rules.partition_spec(spec, mesh))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise UsageError(f"batch_size={batch_size} must be a multiple of data x fsdp = {ways}")


def put_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global batch (the same on every host) as an array sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


# --- multi-host ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def initialize_distributed(config: Mapping[str, Any] | None) -> bool:
    """Start ``jax.distributed`` from config or environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID; on TPU pods and SLURM, JAX finds them itself when ``auto: true``)."""
    config = dict(config or {})
    address = config.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = config.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
    pid = config.get("process_id")
    if pid is None and os.environ.get("JAX_PROCESS_ID") is not None:
        pid = int(os.environ["JAX_PROCESS_ID"])
    if not address and not config.get("auto"):
        return False
    # CPU collectives across processes need an implementation (gloo ships with jaxlib); it is unused
    # on GPU/TPU. The backend must not be touched before initialize(), so do not query it here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if address:
        kwargs = dict(coordinator_address=address, num_processes=int(num), process_id=int(pid))
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
             jax.device_count())
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def gather_to_host(tree):
    """numpy copies of every leaf; arrays spread over hosts are all-gathered (every process must call)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)
