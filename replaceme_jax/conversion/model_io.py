"""Load a model from an HF directory, a GGUF file or an orbax checkpoint, streaming tensor by tensor."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from replaceme_jax.conversion.maps import WEIGHT_MAPS
from replaceme_jax.conversion.weight_map import (
    WeightRule,
    empty_like_specs,
    flatten_params,
    match_hf_key,
    set_path,
    to_params_layout,
)
from replaceme_jax import interrupt
from replaceme_jax.errors import CheckpointError, ReplaceMeError
from replaceme_jax.models import family_for
from replaceme_jax.models.common import ParamSpec

log = logging.getLogger(__name__)

DTYPES = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)

# Placement hook: (param path, spec, host array) -> array. The default puts it on the default device;
# sharded loading passes one that puts each tensor straight into its NamedSharding.
PlaceFn = Callable[[str, ParamSpec, np.ndarray], jax.Array]


def default_place(path: str, spec: ParamSpec, array: np.ndarray) -> jax.Array:
    return jnp.asarray(array)


def dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ReplaceMeError(f"unsupported dtype {name}")
    return name


def parse_dtype(name: str | None):
    if name is None:
        return None
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ReplaceMeError(f"unsupported dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclasses.dataclass
class LoadedModel:
    """A model in memory plus what is needed to write it back out."""

    config: object  # family config (e.g. LlamaConfig)
    params: dict
    hf_config: dict  # raw config.json dict of the source
    source: str
    source_format: str  # "hf" | "gguf" | "orbax"
    dtype: str  # dtype the parameters are held in
    source_dtype: str  # dtype of the source checkpoint (kept on export unless asked otherwise)
    # Where the tokenizer comes from: a directory with tokenizer/generation files, or a GGUF file.
    tokenizer_source: str | None = None

    @property
    def family(self):
        return family_for(self.config.model_type)


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _config_dtype(hf_config: dict) -> str:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


class ParamFiller:
    """Fills a params tree from (HF key, tensor) pairs and checks the one-to-one correspondence.

    A stacked parameter (per-expert HF tensors) is assembled in a host buffer and placed once every
    slice has arrived.
    """

    def __init__(self, config, rules: tuple[WeightRule, ...], dtype, place: PlaceFn, source: str,
                 check_only: bool = False):
        # check_only: arrays are zero-stride stand-ins of the right shape; every check runs, nothing is kept
        self.check_only = check_only
        self.config = config
        self.rules = rules
        self.dtype = dtype
        self.place = place
        self.source = source
        self.specs = family_for(config.model_type).param_specs(config)
        self.flat_specs = flatten_params(self.specs)
        self.params = empty_like_specs(self.specs)
        self.filled: set[str] = set()
        self.stacking: dict[str, tuple[np.ndarray, set[int]]] = {}  # path -> (buffer, slices filled)

    def add(self, hf_key: str, load: Callable[[], np.ndarray]) -> None:
        interrupt.check()
        found = match_hf_key(self.rules, hf_key)
        if found is None:
            if hf_key.endswith("rotary_emb.inv_freq"):  # non-persistent buffer some old exports contain
                return
            raise CheckpointError(f"{self.source}: unexpected tensor {hf_key!r} (not used by {self.config.model_type})")
        rule, fields = found
        paths = rule.param_paths(fields)
        if paths[0].startswith("lm_head.") and self.config.tie_word_embeddings:
            # Some tied checkpoints also store the (identical) head; transformers ignores it, so do we.
            return
        for path in paths:
            if path not in self.flat_specs:
                raise CheckpointError(f"{self.source}: tensor {hf_key!r} does not fit the config (no parameter {path})")
            if path in self.filled:
                raise CheckpointError(f"{self.source}: tensor {hf_key!r} appears twice")
        array = load()
        chunks = [array]
        if rule.parts:
            if array.shape[rule.split_axis] % len(rule.parts):
                raise CheckpointError(f"{self.source}: tensor {hf_key!r} of shape {tuple(array.shape)} does not split "
                                      f"into {len(rule.parts)} along axis {rule.split_axis}")
            chunks = np.split(array, len(rule.parts), axis=rule.split_axis)
        for path, chunk in zip(paths, chunks):
            chunk = np.swapaxes(chunk, -1, -2) if self.check_only and rule.transform == "transpose" \
                else to_params_layout(rule, chunk)
            if rule.stacked:
                self._add_slice(hf_key, path, int(fields["j"]), chunk)
            else:
                self._add_whole(hf_key, path, chunk)

    def _add_whole(self, hf_key: str, path: str, array: np.ndarray) -> None:
        spec = self.flat_specs[path]
        if path in self.stacking:
            raise CheckpointError(f"{self.source}: tensor {hf_key!r} appears twice (also stored per slice)")
        if tuple(array.shape) != spec.shape:
            raise CheckpointError(
                f"{self.source}: tensor {hf_key!r} has shape {tuple(array.shape)}, config implies {spec.shape}"
            )
        if not self.check_only:
            array = array.astype(self.dtype, copy=False)
            set_path(self.params, path, self.place(path, spec, array))
        self.filled.add(path)

    def _add_slice(self, hf_key: str, path: str, index: int, array: np.ndarray) -> None:
        spec = self.flat_specs[path]
        if tuple(array.shape) != spec.shape[1:] or index >= spec.shape[0]:
            raise CheckpointError(
                f"{self.source}: tensor {hf_key!r} (slice {index}, shape {tuple(array.shape)}) does not fit "
                f"parameter {path} of shape {spec.shape}"
            )
        buffer, seen = self.stacking.setdefault(
            path, (None if self.check_only else np.empty(spec.shape, self.dtype), set()))
        if index in seen:
            raise CheckpointError(f"{self.source}: tensor {hf_key!r} appears twice")
        if buffer is not None:
            buffer[index] = array
        seen.add(index)
        if len(seen) == spec.shape[0]:
            del self.stacking[path]
            if buffer is not None:
                set_path(self.params, path, self.place(path, spec, buffer))
            self.filled.add(path)

    def finish(self) -> dict:
        missing = sorted(set(self.flat_specs) - self.filled)
        if missing:
            def describe(path):
                if path not in self.stacking:
                    return path
                absent = sorted(set(range(self.flat_specs[path].shape[0])) - self.stacking[path][1])
                return f"{path} (slices {', '.join(map(str, absent))})"
            shown = ", ".join(describe(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(f"{self.source}: missing {len(missing)} tensor(s): {shown}")
        return self.params


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

        return load_orbax(src, dtype=dtype)
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
