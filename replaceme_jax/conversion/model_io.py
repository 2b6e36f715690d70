"""Load a model from an HF directory, a GGUF file or an orbax checkpoint, streaming tensor by tensor."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from replaceme_jax.conversion.core import (  # noqa: F401  (re-exported: the names users import from here)
    DTYPES,
    TOKENIZER_FILES,
    LoadedModel,
    ParamFiller,
    PlaceFn,
    _config_dtype,
    default_place,
    dtype_name,
    parse_dtype,
    read_config_json,
)
from replaceme_jax.conversion.maps import WEIGHT_MAPS
from replaceme_jax.conversion.weight_map import flatten_params
from replaceme_jax.errors import CheckpointError, ReplaceMeError
from replaceme_jax.models import family_for

log = logging.getLogger(__name__)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index ({e})") from None
        files = sorted({directory / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} is missing")
        return files
    # Only the file transformers itself reads: side files of ours (or anyone's) that happen to end in
    # .safetensors are never taken for weights.
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def iter_hf_tensors(directory: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Yield (key, loader) for every tensor in the directory, one file open at a time."""
    files = _safetensors_files(directory)
    if files:
        from safetensors import SafetensorError, safe_open

        for file in files:
            try:
                handle = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
            with handle as f:
                for key in f.keys():
                    def load(f=f, key=key, file=file):
                        try:
                            return f.get_tensor(key)
                        except (SafetensorError, OSError, ValueError) as e:
                            raise CheckpointError(f"{file}: cannot read tensor {key} ({e})") from None
                    yield key, load
        return
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{directory}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model*.bin)")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{directory}: pytorch_model*.bin weights need torch installed") from None
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        for key in list(state):
            def load(state=state, key=key):
                t = state[key]
                if t.dtype == torch.bfloat16:
                    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                return t.numpy()
            yield key, load
        del state


def shape_stand_in(shape, dtype=np.float32) -> np.ndarray:
    """A read-only array of ``shape`` that occupies one element of memory (all strides zero)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(shape), strides=(0,) * len(shape),
                                           writeable=False)


def iter_hf_shapes(directory: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor, from the safetensors headers alone."""
    files = _safetensors_files(directory)
    if not files:
        if sorted(directory.glob("pytorch_model*.bin")):
            return  # only torch can read those; checked when loaded
        raise CheckpointError(f"{directory}: no weights (model.safetensors, model.safetensors.index.json or "
                              f"pytorch_model*.bin)")
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    yield key, tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def check_model_source(src: str | os.PathLike) -> None:
    """Everything about a checkpoint that can be checked without reading its weights: that it exists,
    its format, config and architecture, and (for HF directories) that every tensor's name and shape
    match the weight map. Cheap: run it before any long work."""
    from replaceme_jax.conversion.assets import BUILTIN_MODELS

    if str(src).lower() in BUILTIN_MODELS and not Path(src).exists():
        return  # fetched (and checked) when loaded
    kind = detect_format(src)
    path = Path(src)
    if kind == "gguf":
        from replaceme_jax.conversion.gguf_metadata import check_gguf_architecture

        check_gguf_architecture(path)
        return
    if kind == "orbax":
        return
    hf_config = read_config_json(path)
    config = family_for(hf_config.get("model_type")).config_from_hf(hf_config)
    filler = ParamFiller(config, WEIGHT_MAPS[config.model_type], np.float32, default_place, str(path),
                         check_only=True)
    shapes = list(iter_hf_shapes(path))
    if not shapes:  # pytorch_model*.bin
        return
    for key, shape in shapes:
        filler.add(key, lambda shape=shape: shape_stand_in(shape))
    filler.finish()


def load_hf_directory(directory: str | os.PathLike, dtype: str | None = None,
                      place: PlaceFn = default_place) -> LoadedModel:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    hf_config = read_config_json(directory)
    config = family_for(hf_config.get("model_type")).config_from_hf(hf_config)
    source_dtype = _config_dtype(hf_config)
    target = dtype or source_dtype
    filler = ParamFiller(config, WEIGHT_MAPS[config.model_type], parse_dtype(target), place, str(directory))
    for key, load in iter_hf_tensors(directory):
        filler.add(key, load)
    params = filler.finish()
    return LoadedModel(config=config, params=params, hf_config=hf_config, source=str(directory),
                       source_format="hf", dtype=target, source_dtype=source_dtype, tokenizer_source=str(directory))


def detect_format(src: str | os.PathLike) -> str:
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise CheckpointError(f"{src}: not a GGUF file (expected an HF directory, a GGUF file or an orbax checkpoint)")
    from replaceme_jax.conversion.orbax_io import is_orbax_checkpoint

    if is_orbax_checkpoint(path):
        return "orbax"
    return "hf"


def load_model(src: str | os.PathLike, dtype: str | None = None, place: PlaceFn = default_place) -> LoadedModel:
    """Load anything ``convert`` accepts: an HF directory, a GGUF file, or an orbax checkpoint of this tool."""
    from replaceme_jax.conversion.assets import resolve_builtin

    src = resolve_builtin(str(src))
    kind = detect_format(src)
    if kind == "gguf":
        from replaceme_jax.conversion.gguf_io import load_gguf

        return load_gguf(src, dtype=dtype, place=place)
    if kind == "orbax":
        from replaceme_jax.conversion.orbax_io import load_orbax

        return load_orbax(src, dtype=dtype, place=place)
    return load_hf_directory(src, dtype=dtype, place=place)


def check_finite(params, where: str) -> None:
    """Refuse NaN/Inf weights, naming the first offending parameter."""
    for path, leaf in flatten_params(params).items():
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise CheckpointError(f"{where}: parameter {path} contains NaN or Inf")


def load_tokenizer(model: LoadedModel):
    """The model's tokenizer through `transformers` (from the HF directory or the GGUF metadata)."""
    from transformers import AutoTokenizer

    source = model.tokenizer_source
    if source is None:
        raise ReplaceMeError(f"{model.source}: no tokenizer available")
    path = Path(source)
    if path.is_file():
        from replaceme_jax.conversion.gguf_metadata import gguf_tokenizer

        return gguf_tokenizer(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ReplaceMeError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return AutoTokenizer.from_pretrained(str(path))
