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
    """The state directory of one run."""

    def __init__(self, save_path: str | os.PathLike, config: dict, model: dict, every: int, restart: bool = False):
        self.dir = Path(save_path) / STATE_DIR
        self.every = every
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        meta = {"config": {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}, "model": model}
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            saved = json.loads(meta_file.read_text())
            for section in ("config", "model"):
                old, new = saved.get(section, {}), json.loads(json.dumps(meta[section]))
                for key in sorted(set(old) | set(new)):
                    if old.get(key) != new.get(key):
                        what = f"config field {key!r}" if section == "config" else f"model ({key})"
                        raise UsageError(f"{self.dir}: cannot resume, {what} differs from the interrupted run "
                                         f"(pass --restart to discard its state)")
            log.info("resuming from %s", self.dir)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = meta_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1, default=str))
            tmp.replace(meta_file)

    def pass_state(self, name: str) -> "PassState":
        return PassState(self.dir / name, self.every)

    # completed blocks (T and solver info), so a resumed multi-block run does not refit them
    def save_block(self, index: int, T: np.ndarray | None, info: dict) -> None:
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


class PassState:
    """Orbax checkpoints of one streaming pass: ``{step: batches done, arrays...}``, the latest kept."""

    def __init__(self, directory: Path, every: int):
        import orbax.checkpoint as ocp

        self.every = every
        self.manager = ocp.CheckpointManager(directory.resolve(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def restore(self, template: dict) -> tuple[int, dict] | None:
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return None
        state = self.manager.restore(step, args=ocp.args.StandardRestore(template))
        return int(step), {k: np.asarray(v) for k, v in state.items()}

    def save(self, batches_done: int, state: dict, force: bool = False) -> None:
        import orbax.checkpoint as ocp

        if not force and (self.every <= 0 or batches_done % self.every):
            return
        self.manager.save(batches_done, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
