"""Resumable runs: streaming state saved with orbax under ``save_path/.state/``.

A rerun of the same command after a crash or ``kill -9`` picks up each pass at its last saved batch
and gives the same result as an uninterrupted run (the float64 sums are restored exactly and the
remaining batches are added in the same order). A changed config or model refuses to resume and
names the field; ``--restart`` discards the state.

Several processes (``jax.distributed``): every process reads the state, so that all of them skip the
same finished batches and blocks and their collectives stay in step; process 0 alone writes it. The
state directory must therefore be on storage every process reads (``save_path`` on a shared file
system). Each read is followed by a check, itself a collective, that every process found the same
state: a directory that only some processes see stops the run with an error instead of a hang.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from replaceme_jax.errors import ReplaceMeError, UsageError

log = logging.getLogger(__name__)


# --- several processes ------------------------------------------------------------------------------


def _process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def is_writer() -> bool:
    """Only process 0 writes the state."""
    return _process()[0] == 0


def all_processes(values) -> np.ndarray:
    """``values`` (small ints) of every process, ``[process, len(values)]``. With several processes this
    is a collective: every process must call it at the same point (it is also a barrier)."""
    row = np.asarray(values, np.int32).reshape(-1)
    if _process()[1] == 1:
        return row[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row)).reshape(_process()[1], -1)


def barrier(name: str) -> None:
    if _process()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_state(what: str, value: int, where: Path) -> None:
    """Every process must have found the same saved state of ``what``: ``value`` is -1 for none, else
    what was found (a step, or 0 for "present")."""
    seen = all_processes([value])[:, 0]
    if np.any(seen != seen[0]):
        found = ", ".join(f"process {i}: " + ("none" if v < 0 else "present" if v == 0 else f"step {v}")
                          for i, v in enumerate(seen))
        raise ReplaceMeError(f"{where}: the processes found different saved states for {what} ({found}); "
                             f"the state directory must be on storage that every process reads "
                             f"(put save_path on a shared file system, or set checkpoint_every: 0)")

STATE_DIR = ".state"
# Keys that do not change the result: a resumed run may differ in them. ``distributed`` holds the
# coordinator's address and each process's own id (the processes of one job differ in it).
NON_SEMANTIC_KEYS = ("overwrite", "checkpoint_every", "save_path", "distances_path", "distributed")


def model_fingerprint(path: str) -> dict:
    """Names, sizes and modification times of the checkpoint's files (cheap; no hashing of weights)."""
    p = Path(path)
    if not p.exists():
        return {"path": path}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {"path": str(p.resolve()),
            "files": {str(f.relative_to(p) if p.is_dir() else f.name): [f.stat().st_size, int(f.stat().st_mtime)]
                      for f in files}}


def only_state(directory: Path) -> bool:
    """True if ``directory`` holds nothing but a resumable state."""
    return directory.is_dir() and {p.name for p in directory.iterdir()} <= {STATE_DIR}


class RunState:
    """The state directory of one run. Nothing is written until the first save, so a run that fails
    early leaves no trace; a rerun that finds a state checks it belongs to the same config and model."""

    def __init__(self, save_path: str | os.PathLike, config: dict, model: dict, every: int | str,
                 restart: bool = False):
        self.dir = Path(save_path) / STATE_DIR
        self.every = every
        self.started = time.monotonic()
        if restart:
            if is_writer() and self.dir.exists():
                shutil.rmtree(self.dir)
            barrier("replaceme_jax: state discarded")  # nobody reads the old state after this point
        self.meta = {"config": {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}, "model": model}
        meta_file = self.dir / "meta.json"
        exists = meta_file.is_file()
        problem = self._difference(json.loads(meta_file.read_text())) if exists else None
        # Every process comes to the same verdict (collectives: every process constructs the RunState).
        check_same_state("the run", 0 if exists else -1, self.dir)
        refused = all_processes([problem is not None])[:, 0]
        if problem is not None:
            raise UsageError(problem)
        if refused.any():
            raise UsageError(f"{self.dir}: cannot resume, process {int(np.argmax(refused))} found that its config "
                             f"or model differs from the interrupted run (see its log; --restart discards the state)")
        if exists:
            log.info("resuming from %s", self.dir)

    def _difference(self, saved: dict) -> str | None:
        for section in ("config", "model"):
            old, new = saved.get(section, {}), json.loads(json.dumps(self.meta[section], default=str))
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    what = f"config field {key!r}" if section == "config" else f"model ({key})"
                    return (f"{self.dir}: cannot resume, {what} differs from the interrupted run "
                            f"(pass --restart to discard its state)")
        return None

    def ensure(self) -> None:
        """Create the state directory with its metadata (before the first save; process 0 only)."""
        meta_file = self.dir / "meta.json"
        if meta_file.is_file() or not is_writer():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1, default=str))
        tmp.replace(meta_file)

    def pass_state(self, name: str) -> "PassState":
        return PassState(self.dir / name, self.every, self.ensure)

    # completed blocks (T and solver info), so a resumed multi-block run does not refit them
    def save_block(self, index: int, T: np.ndarray | None, info: dict) -> None:
        if not is_writer():
            return
        if self.every == "auto" and time.monotonic() - self.started < AUTO_MIN_INTERVAL_S and not self.dir.exists():
            return  # a short run is cheaper to redo than to leave state behind
        self.ensure()
        target = self.dir / f"block_{index}.npz"
        tmp = self.dir / f"block_{index}.tmp.npz"
        np.savez(tmp, T=np.zeros(0) if T is None else T, has_T=T is not None, info=json.dumps(info, default=str))
        tmp.replace(target)

    def load_block(self, index: int):
        """Block ``index`` as saved (T, info), or None. Every process must call it (see the module doc)."""
        path = self.dir / f"block_{index}.npz"
        check_same_state(f"block {index}", 0 if path.is_file() else -1, self.dir)
        if not path.is_file():
            return None
        data = np.load(path)
        return (data["T"] if bool(data["has_T"]) else None), json.loads(str(data["info"]))


# checkpoint_every: auto saves when at least AUTO_MIN_INTERVAL_S have passed and at least
# AUTO_COST_RATIO times the last save's duration, so saving costs at most 1 / (1 + ratio) of a pass.
AUTO_MIN_INTERVAL_S = 60.0
AUTO_COST_RATIO = 20.0


class PassState:
    """Orbax checkpoints of one streaming pass: ``{step: batches done, arrays...}``, the latest kept.

    ``every``: save every that many batches, or ``"auto"`` (by time, see ``AUTO_COST_RATIO``).
    Every process restores (and must call ``restore``, a collective); only process 0 saves. The orbax
    manager of each process is its own (``active_processes`` = itself): the host-side sums are the same
    on every process, so no save or restore needs the others."""

    def __init__(self, directory: Path, every: int | str, ensure_parent=None):
        self.directory = directory.resolve()
        self.every = every
        self.ensure_parent = ensure_parent
        self._manager = None
        self.last_save_end = time.monotonic()
        self.last_save_seconds = 0.0

    def _get_manager(self, create: bool):
        import orbax.checkpoint as ocp

        if self._manager is None and (create or self.directory.is_dir()):
            writer = is_writer()
            if create and writer:
                if self.ensure_parent is not None:
                    self.ensure_parent()
                self.directory.mkdir(parents=True, exist_ok=True)
            me = _process()[0]
            self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=1 if writer else None, save_interval_steps=1 if writer else 0, create=False,
                read_only=not writer,
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})))
        return self._manager

    def restore(self, template: dict) -> tuple[int, dict] | None:
        """The latest saved ``(step, state)``, or None. Every process must call it: each reads the
        state, then all check that they found the same step."""
        import orbax.checkpoint as ocp

        manager = self._get_manager(create=False)
        step = manager.latest_step() if manager is not None else None
        check_same_state(self.directory.name, -1 if step is None else int(step), self.directory.parent)
        if step is None:
            return None
        state = manager.restore(step, args=ocp.args.StandardRestore(template))
        log.info("%s: resuming after %d batches", self.directory.name, step)
        return int(step), {k: np.asarray(v) for k, v in state.items()}

    def due(self, batches_done: int) -> bool:
        if self.every == "auto":
            waited = time.monotonic() - self.last_save_end
            return waited >= max(AUTO_MIN_INTERVAL_S, AUTO_COST_RATIO * self.last_save_seconds)
        return self.every > 0 and batches_done % self.every == 0

    def save(self, batches_done: int, state: dict | Callable[[], dict], force: bool = False) -> None:
        """Save ``state`` (a dict, or a function that builds it only when a save is due) as step
        ``batches_done``; process 0 only (the others return at once)."""
        import orbax.checkpoint as ocp

        if not is_writer() or (not force and not self.due(batches_done)):
            return
        began = time.monotonic()
        manager = self._get_manager(create=True)
        manager.save(batches_done, args=ocp.args.StandardSave(state() if callable(state) else state), force=True)
        manager.wait_until_finished()
        self.last_save_end = time.monotonic()
        self.last_save_seconds = self.last_save_end - began

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
