"""Reports: JSON, the distance profile as CSV and PNG."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB).

    Linux's ``VmHWM`` where available: ``ru_maxrss`` keeps the high-water mark of the parent image a
    process was forked from, so a run started by a big Python process reported the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StageTimer:
    """Wall time per named stage (seconds) and the process's peak RSS at the end of each stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, quiet: bool = False):
        """Time a stage; ``quiet`` logs it at DEBUG (for steps repeated many times inside a stage)."""
        level = logging.DEBUG if quiet else logging.INFO
        start = time.perf_counter()
        log.log(level, "stage %s ...", name)
        outcome = "done"
        try:
            yield
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self.peak_rss_mb[name] = peak_rss_mb()
            log.log(level, "stage %s %s after %.1f s", name, outcome, elapsed)


def write_distances_csv(path: Path, distances: dict[int, float], n: int, chosen: Sequence[tuple[int, int]]) -> None:
    chosen_starts = {s for s, _ in chosen}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "end", "distance", "chosen"])
        for start in sorted(distances):
            writer.writerow([start, start + n, f"{distances[start]:.6f}", int(start in chosen_starts)])


def plot_distances(path: Path, distances: dict[int, float], n: int, chosen: Sequence[tuple[int, int]],
                   title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = sorted(distances)
    values = [distances[s] for s in starts]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(starts, values, marker="o", ms=3, lw=1.2)
    for start, end in chosen:
        ax.axvspan(start - 0.4, start + 0.4, color="tab:red", alpha=0.25)
        if start in distances:
            ax.annotate(f"({start}, {end})", (start, distances[start]), textcoords="offset points", xytext=(0, 8),
                        ha="center", color="tab:red", fontsize=8)
    ax.set_xlabel(f"block start s (block removes layers s .. s+{n - 1})")
    ax.set_ylabel("angular distance / pi")
    ax.set_title(title or f"Angular distance h_s vs h_(s+{n})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_saliency_heatmap(path: Path, saliency: Sequence[Sequence[float]], kept: Sequence[Sequence[int]] | None,
                          title: str = "") -> None:
    """Experts x layers heatmap of a saliency score; kept experts are marked with a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.asarray(saliency, np.float64)  # [layers, experts]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * grid.shape[1] + 2), max(3.0, 0.25 * grid.shape[0] + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    if kept is not None:
        for layer, experts in enumerate(kept):
            ax.scatter(experts, [layer] * len(experts), s=6, c="white", marker="o")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(to_jsonable(data), indent=2))
