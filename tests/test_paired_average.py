"""bench/paired_average.py: the share's bootstrap figure does not depend on which other item counts were asked."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import ROOT, load_bench_script

SCRIPT = ROOT / "bench" / "paired_average.py"
FOUR = load_bench_script("paired_average").FOUR  # the script's own task list: the fake reports carry what it averages


def report(path: Path, name: str, rng) -> str:
    outcomes = {task: {metric: rng.integers(0, 2, 80).tolist()} for task, metric in FOUR}
    path.write_text(json.dumps({"models": {name: {"outcomes": outcomes}}}))
    return str(path)


def share(tmp_path: Path, first: str, reports: list[str]) -> dict:
    out = tmp_path / f"share_{first.replace(',', '_')}.json"
    subprocess.run([sys.executable, str(SCRIPT), *reports, "--first", first, "--resamples", "200",
                    "--output", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())["pruned"]["pruned"]["all"]["average_of_four"]


def test_bootstrap_is_the_same_whatever_else_was_asked(tmp_path):
    rng = np.random.default_rng(1)
    reports = [report(tmp_path / "original.json", "original", rng), report(tmp_path / "pruned.json", "pruned", rng)]
    alone = share(tmp_path, "all", reports)
    after_another = share(tmp_path, "40,all", reports)
    assert alone == after_another
