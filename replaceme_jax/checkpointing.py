"""Resumable runs: streaming state saved with orbax under ``save_path/.state/``.

A rerun of the same command after a crash or ``kill -9`` picks up each pass at its last saved batch
and gives the same result as an uninterrupted run (the float64 sums are restored exactly and the
remaining batches are added in the same order). A changed config or model refuses to resume and
names the field; ``--restart`` discards the state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from replaceme_jax.errors import UsageError

log = logging.getLogger(__name__)

STATE_DIR = ".state"
# Keys that do not change the result: a resumed run may differ in them.
NON_SEMANTIC_KEYS = ("overwrite", "checkpoint_every", "save_path", "distances_path")


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
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        self.meta = {"config": {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}, "model": model}
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            saved = json.loads(meta_file.read_text())
            for section in ("config", "model"):
                old, new = saved.get(section, {}), json.loads(json.dumps(self.meta[section], default=str))
                for key in sorted(set(old) | set(new)):
                    if old.get(key) != new.get(key):
                        what = f"config field {key!r}" if section == "config" else f"model ({key})"
                        raise UsageError(f"{self.dir}: cannot resume, {what} differs from the interrupted run "
                                         f"(pass --restart to discard its state)")
            log.info("resuming from %s", self.dir)

    def ensure(self) -> None:
        """Create the state directory with its metadata (before the first save)."""
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1, default=str))
        tmp.replace(meta_file)

    def pass_state(self, name: str) -> "PassState":
        return PassState(self.dir / name, self.every, self.ensure)

    # completed blocks (T and solver info), so a resumed multi-block run does not refit them
    def save_block(self, index: int, T: np.ndarray | None, info: dict) -> None:
        if self.every == "auto" and time.monotonic() - self.started < AUTO_MIN_INTERVAL_S and not self.dir.exists():
            return  # a short run is cheaper to redo than to leave state behind
        self.ensure()
        target = self.dir / f"block_{index}.npz"
        tmp = self.dir / f"block_{index}.tmp.npz"
        np.savez(tmp, T=np.zeros(0) if T is None else T, has_T=T is not None, info=json.dumps(info, default=str))
        tmp.replace(target)

    def load_block(self, index: int):
        path = self.dir / f"block_{index}.npz"
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

    ``every``: save every that many batches, or ``"auto"`` (by time, see ``AUTO_COST_RATIO``)."""

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
            if create and self.ensure_parent is not None:
                self.ensure_parent()
            self._manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        return self._manager

    def restore(self, template: dict) -> tuple[int, dict] | None:
        import orbax.checkpoint as ocp

        manager = self._get_manager(create=False)
        step = manager.latest_step() if manager is not None else None
        if step is None:
            return None
        state = manager.restore(step, args=ocp.args.StandardRestore(template))
        return int(step), {k: np.asarray(v) for k, v in state.items()}

    def due(self, batches_done: int) -> bool:
        if self.every == "auto":
            waited = time.monotonic() - self.last_save_end
            return waited >= max(AUTO_MIN_INTERVAL_S, AUTO_COST_RATIO * self.last_save_seconds)
        return self.every > 0 and batches_done % self.every == 0

    def save(self, batches_done: int, state: dict, force: bool = False) -> None:
        import orbax.checkpoint as ocp

        if not force and not self.due(batches_done):
            return
        began = time.monotonic()
        manager = self._get_manager(create=True)
        manager.save(batches_done, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
        self.last_save_end = time.monotonic()
        self.last_save_seconds = self.last_save_end - began

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
