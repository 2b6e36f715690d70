"""Write params back out as an HF directory that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from replaceme_jax.conversion.atomic import atomic_output_dir
from replaceme_jax.conversion.maps import WEIGHT_MAPS
from replaceme_jax.conversion.core import TOKENIZER_FILES, LoadedModel, dtype_name, parse_dtype
from replaceme_jax.conversion.weight_map import flatten_params, param_to_hf_keys, to_hf_layout
from replaceme_jax import interrupt
from replaceme_jax.errors import ReplaceMeError
from replaceme_jax.models.common import DROP_FIELD, IfPresent

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def export_config(model: LoadedModel, dtype: str) -> dict:
    """The source config.json with sizes and every per-layer field made consistent with the params."""
    cfg = dict(model.hf_config)
    for key, value in model.family.config_to_hf_updates(model.config).items():
        if value is DROP_FIELD:  # a field the kept layers no longer follow (e.g. a sliding-window pattern)
            cfg.pop(key, None)
        elif isinstance(value, IfPresent):
            if key in cfg:
                cfg[key] = value.value
        else:
            cfg[key] = value
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    cfg["model_type"] = model.config.model_type
    if not cfg.get("architectures"):
        cfg["architectures"] = [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "gemma2": "Gemma2ForCausalLM",
             "gemma3_text": "Gemma3ForCausalLM"}[model.config.model_type]
        ]
    return cfg


def _host_tensor(rule, leaf, dtype) -> np.ndarray:
    array = np.asarray(leaf)
    if array.dtype != dtype:
        array = array.astype(dtype)
    return to_hf_layout(rule, array)


def write_tokenizer(model: LoadedModel, out: Path) -> None:
    source = model.tokenizer_source
    if source is None:
        log.warning("no tokenizer source; the exported directory has no tokenizer files")
        return
    path = Path(source)
    if path.is_file():  # GGUF: rebuild the tokenizer from its metadata
        from replaceme_jax.conversion.gguf_metadata import gguf_tokenizer

        gguf_tokenizer(path).save_pretrained(str(out))
        _write_generation_config(model, out)
        return
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            shutil.copy2(path / name, out / name)


def _write_generation_config(model: LoadedModel, out: Path) -> None:
    from transformers import GenerationConfig, PretrainedConfig

    generation = GenerationConfig.from_model_config(PretrainedConfig(**{
        k: model.hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model.hf_config
    }))
    generation.save_pretrained(str(out))


def write_hf_weights(model: LoadedModel, out: Path, dtype, max_shard_bytes: int) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    rules = WEIGHT_MAPS[model.config.model_type]
    itemsize = np.dtype(dtype).itemsize
    # (key, rule, path, leaf, slice index or None): a stacked parameter is one HF tensor per slice
    shards: list[list[tuple]] = [[]]
    size = 0
    for path, leaf in flatten_params(model.params).items():
        rule, keys = param_to_hf_keys(rules, path, leaf.shape)
        nbytes = int(np.prod(leaf.shape)) * itemsize // len(keys)
        for key, index in keys:
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, rule, path, leaf, index))
            size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        interrupt.check()
        # One shard on host at a time keeps host memory at max_shard_bytes beyond the params.
        tensors = {}
        host_path = host = None
        for key, rule, path, leaf, index in shard:
            if path != host_path:  # one device-to-host copy per parameter, not per slice
                host_path, host = path, np.asarray(leaf)
            tensors[key] = _host_tensor(rule, host if index is None else host[index], dtype)
        del host
        total += sum(t.nbytes for t in tensors.values())
        try:
            save_file(tensors, str(out / name), metadata={"format": "pt"})
        except SafetensorError as e:  # e.g. a full disk: one line, as for any other failed write
            raise ReplaceMeError(f"{out / name}: cannot write ({e})") from None
        weight_map.update({key: name for key in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_hf(model: LoadedModel, dst: str | os.PathLike, dtype: str | None = None, *, overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, write_extra=None) -> Path:
    """Write ``model`` as an HF directory at ``dst`` (atomically). ``dtype`` defaults to the source's.

    ``write_extra(tmp_dir)`` may add files (reports) before the directory appears.
    """
    dtype = dtype or model.source_dtype
    np_dtype = parse_dtype(dtype)
    dtype = dtype_name(np_dtype)
    dst = Path(dst)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        write_hf_weights(model, tmp, np_dtype, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(export_config(model, dtype), indent=2, sort_keys=True))
        write_tokenizer(model, tmp)
        if write_extra is not None:
            write_extra(tmp)
    log.info("wrote %s", dst)
    return dst


def exported_bytes(params, dtype) -> int:
    return sum(int(np.prod(x.shape)) for x in flatten_params(params).values()) * np.dtype(parse_dtype(dtype)).itemsize


def check_output_location(dst: str | os.PathLike, needed_bytes: int) -> None:
    """Fail before any heavy work if the output cannot be written or would not fit on its disk."""
    parent = Path(dst).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ReplaceMeError(f"{dst}: output location is not writable")
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise ReplaceMeError(f"{dst}: not enough disk space ({needed_bytes / 2**20:.0f} MiB needed, "
                             f"{free / 2**20:.0f} MiB free)")
