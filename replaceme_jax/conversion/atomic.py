"""Outputs that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from replaceme_jax import interrupt
from replaceme_jax.errors import OutputExistsError, ReplaceMeError

MARKER_FILES = ("config.json", "replaceme_report.json", "_CHECKPOINT_METADATA", "replaceme_jax.json")


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a temp dir beside ``dst``; rename it to ``dst`` only if the block succeeds.

    An existing non-empty ``dst`` is replaced only with ``overwrite``; a failure leaves no partial output.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise OutputExistsError(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))
    except OSError as e:
        raise ReplaceMeError(f"{dst}: cannot create output ({e.strerror or e})") from None
    interrupt.register_temporary(tmp)
    try:
        yield tmp
        interrupt.check()  # a stop asked during the last write: do not publish the output
        _apply_umask(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=parent))
            os.rename(dst, old / "x")
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        interrupt.unregister_temporary(tmp)


def _apply_umask(root: Path) -> None:
    # mkdtemp creates 0700; the output should get the permissions a plain mkdir/open would give.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)
