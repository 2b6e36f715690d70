"""Progress for long stages: a tqdm bar on a terminal, a log line every few percent otherwise.

Redirected to a file, tqdm writes a carriage-return frame per update (40 KB of them for one
evaluation); a log line every ``LOG_EVERY_PERCENT`` reads better and greps well. Multi-host runs show
progress on process 0 only.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("replaceme_jax.progress")

LOG_EVERY_PERCENT = 10


class LogProgress:
    """The part of tqdm's interface this package uses, reporting through ``logging``."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self.next_percent = LOG_EVERY_PERCENT

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled or not self.total:
            return
        percent = 100 * self.n / self.total
        if percent >= self.next_percent:
            self.next_percent = (int(percent) // LOG_EVERY_PERCENT + 1) * LOG_EVERY_PERCENT
            elapsed = time.perf_counter() - self.start
            log.info("%s: %d%% (%d/%d %s, %.0f s%s)", self.desc, min(100, int(percent)), self.n, self.total, self.unit,
                     elapsed, f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _main_process() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # no backend yet: a single process
        return True


def progress_bar(total: int, desc: str, unit: str = "batch", enabled: bool = True, leave: bool = True):
    """A progress reporter for ``total`` steps: tqdm on a terminal, ``LogProgress`` otherwise."""
    enabled = enabled and _main_process()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled, leave=leave)
    return LogProgress(total, desc, unit, enabled)
