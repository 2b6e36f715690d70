"""Prompt Ctrl-C for long runs.

A jitted step or an XLA compilation cannot be interrupted from Python, and a signal reaches a
blocked main thread only when the call returns, which can take tens of seconds on a CPU. So the CLI
runs each command in a worker thread and keeps the main thread free to receive Ctrl-C. It then
``request``s a stop, which the worker honours at its next ``check()`` (every batch, decoding chunk
or shard) by raising ``KeyboardInterrupt``, so the usual cleanup runs. Temporary output directories
are registered here so the main thread can remove them itself if the worker is still inside a long
call when the grace period ends.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

_requested = threading.Event()
_temporary: set[Path] = set()
_lock = threading.Lock()


def request() -> None:
    _requested.set()


def clear() -> None:
    _requested.clear()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` in the worker if a stop was requested."""
    if _requested.is_set():
        raise KeyboardInterrupt


def register_temporary(path: Path) -> None:
    with _lock:
        _temporary.add(Path(path))


def unregister_temporary(path: Path) -> None:
    with _lock:
        _temporary.discard(Path(path))


def remove_temporaries() -> None:
    """Delete every registered temporary directory (called by the main thread on an interrupt)."""
    with _lock:
        paths = list(_temporary)
        _temporary.clear()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
