"""What every checkpoint reader and writer shares: the in-memory model, dtypes, and the streaming
parameter filler. It imports no reader or writer, so they can all import it (no cycles)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

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


