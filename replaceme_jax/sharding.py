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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from replaceme_jax.errors import UsageError
from replaceme_jax.models.common import ParamSpec, is_spec, map_specs

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
class Replicated:
    """One dim of one parameter that its rule maps to a mesh axis but that stays replicated."""

    path: str
    shape: tuple[int, ...]
    size: int  # of the dim
    logical: str
    mesh_axis: str
    reason: str  # "indivisible": dim % axis size != 0; "reused": the mesh axis already shards another dim


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis. A dim its rule cannot shard (the mesh axis does not divide it, or
    shards another dim of the same array already) stays replicated; ``shard_params`` says so in one
    warning per call, or refuses with ``strict=True``."""

    rules: tuple[tuple[str, str | None], ...] = tuple(DEFAULT_RULES.items())
    strict: bool = False

    def mesh_axis(self, logical: str | None) -> str | None:
        return dict(self.rules).get(logical) if logical is not None else None

    def _resolve(self, spec: ParamSpec, mesh: Mesh) -> tuple[P, list[tuple[int, str, str, str]]]:
        used: set[str] = set()
        out, dropped = [], []
        for dim, logical in zip(spec.shape, spec.logical_axes):
            axis = self.mesh_axis(logical)
            if axis is None or mesh.shape.get(axis, 1) == 1:
                out.append(None)
            elif axis in used or dim % mesh.shape[axis]:
                out.append(None)
                dropped.append((dim, logical, axis, "reused" if axis in used else "indivisible"))
            else:
                used.add(axis)  # one mesh axis at most once per array
                out.append(axis)
        return P(*out), dropped

    def partition_spec(self, spec: ParamSpec, mesh: Mesh) -> P:
        """Map logical axes to mesh axes; a dim not divisible by its mesh axis stays replicated."""
        return self._resolve(spec, mesh)[0]

    def replicated(self, specs, mesh: Mesh) -> list[Replicated]:
        """Every dim of ``specs`` (a pytree of ParamSpec) that its rule would shard but that stays
        replicated on ``mesh``."""
        found: list[Replicated] = []

        def visit(path, spec: ParamSpec):
            for size, logical, axis, reason in self._resolve(spec, mesh)[1]:
                name = jax.tree_util.keystr(path, simple=True, separator=".")
                found.append(Replicated(name, spec.shape, size, logical, axis, reason))
            return spec

        jax.tree_util.tree_map_with_path(visit, specs, is_leaf=is_spec)
        return found


def replication_summary(found: list[Replicated], mesh: Mesh) -> str:
    """One entry per (logical axis, mesh axis, reason): how many tensors, the dim sizes, their names.
    Layer indices are folded (``layers.*.mlp.up_proj.kernel``) so a 32-layer model reads as one entry."""
    groups: dict[tuple, dict] = {}
    for r in found:
        key = (r.logical, r.mesh_axis, r.reason)
        group = groups.setdefault(key, {"count": 0, "names": [], "sizes": set()})
        group["count"] += 1
        group["sizes"].add(r.size)
        name = ".".join("*" if part.isdigit() else part for part in r.path.split("."))
        if name not in group["names"]:
            group["names"].append(name)
    lines = []
    for (logical, axis, reason), group in sorted(groups.items()):
        why = (f"not divisible by {axis}={mesh.shape[axis]}" if reason == "indivisible"
               else f"{axis} already shards another dim of the same array")
        names = ", ".join(group["names"][:4]) + (", ..." if len(group["names"]) > 4 else "")
        sizes = ", ".join(str(v) for v in sorted(group["sizes"]))
        lines.append(f"'{logical}' (size {sizes}) -> {axis}, {why}: {group['count']} tensor(s): {names}")
    return "; ".join(lines)


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
    """The ``data`` x ``fsdp`` x ``tensor`` mesh of ``mesh_config`` over ``devices`` (default: all).

    ``jax.make_mesh`` orders the devices by the physical topology (rings on TPU, NVLink islands on
    GPU), which a plain reshape of ``jax.devices()`` ignores. Axes are ``Auto`` (sharding propagated
    by XLA), as with ``Mesh(...)``: ``jax.make_mesh`` defaults to ``Explicit`` axes. If the topology
    has no assignment for the requested shape, the plain reshape is used, with a warning.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    except (NotImplementedError, ValueError, AssertionError) as e:
        log.warning("mesh %s: no topology-aware device order (%s); using the devices in jax.devices() order",
                    sizes, e)
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_shardings(specs, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    return map_specs(lambda s: NamedSharding(mesh, rules.partition_spec(s, mesh)), specs)


def check_replication(specs, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> list[Replicated]:
    """Say once, in one warning, which parameters stay replicated along a mesh axis their rule names
    (``rules.strict``: refuse instead). A replicated tensor costs its full size on every device of
    that axis, which shows only when memory runs out on a large mesh."""
    found = rules.replicated(specs, mesh)
    if found:
        summary = replication_summary(found, mesh)
        if rules.strict:
            raise UsageError(f"sharding: cannot shard as the rules ask on mesh {dict(mesh.shape)}: {summary}")
        log.warning("sharding: %d tensor dim(s) stay replicated on mesh %s: %s", len(found), dict(mesh.shape),
                    summary)
    return found


def shard_params(params, specs, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """``params`` placed by ``specs`` and ``rules`` (one warning for what cannot be sharded as asked)."""
    check_replication(specs, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, param_shardings(specs, mesh, rules))


class MeshPlacement:
    """A loader hook that puts each tensor straight into its sharded device array (no full copy per
    device; on several hosts each host fills only its own shards). Loaders that restore whole
    checkpoints at once (orbax) ask ``sharding(spec)`` instead, so each device reads only its shard."""

    def __init__(self, mesh: Mesh, rules: ShardingRules = ShardingRules()):
        self.mesh, self.rules = mesh, rules

    def sharding(self, spec: ParamSpec) -> NamedSharding:
        return NamedSharding(self.mesh, self.rules.partition_spec(spec, self.mesh))

    def __call__(self, path: str, spec: ParamSpec, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, self.sharding(spec), lambda index: array[index])


def place_fn(mesh: Mesh, rules: ShardingRules = ShardingRules()) -> MeshPlacement:
    return MeshPlacement(mesh, rules)


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


def settle(tree):
    """``tree``, waited for when it lives on several simulated CPU devices. XLA:CPU runs every device's
    share of a program on one shared thread pool, so the collectives of several multi-device programs
    in flight at once can wait on each other until its 40 s rendezvous timeout aborts the process
    (seen with 8 simulated devices under load); one program at a time avoids it. GPUs and TPUs, and
    one device, are never waited for."""
    leaf = next((x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)), None)
    if leaf is not None and len(leaf.sharding.device_set) > 1 and next(iter(leaf.sharding.device_set)).platform == "cpu":
        jax.block_until_ready(tree)
    return tree
