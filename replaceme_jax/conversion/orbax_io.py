"""Orbax checkpoints of converted params: the native format for JAX users.

Layout: ``DST/params/`` (orbax PyTree checkpoint), ``DST/replaceme_jax.json`` (source config.json and
dtypes), ``DST/tokenizer/`` (tokenizer and generation files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from replaceme_jax.conversion.atomic import atomic_output_dir
from replaceme_jax.conversion.core import LoadedModel, PlaceFn, default_place, dtype_name, parse_dtype
from replaceme_jax.errors import CheckpointError
from replaceme_jax.models import family_for
from replaceme_jax.models.common import map_specs

META_FILE = "replaceme_jax.json"
FORMAT_VERSION = 1


def is_orbax_checkpoint(path: Path) -> bool:
    return (path / META_FILE).is_file()


def save_orbax(model: LoadedModel, dst: str | os.PathLike, dtype: str | None = None, *, overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    from replaceme_jax.conversion.export import write_tokenizer

    params = model.params
    if dtype is not None:
        target = parse_dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(target), params)
        dtype = dtype_name(target)
    else:
        dtype = model.dtype
    dst = Path(dst)
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.resolve() / "params", params)
            checkpointer.wait_until_finished()
        meta = {"format_version": FORMAT_VERSION, "hf_config": model.hf_config, "dtype": dtype,
                "source_dtype": model.source_dtype, "source": model.source}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / "tokenizer").mkdir()
        write_tokenizer(model, tmp / "tokenizer")
    return dst


def load_orbax(src: str | os.PathLike, dtype: str | None = None, place: PlaceFn = default_place) -> LoadedModel:
    """Restore a checkpoint of ``save_orbax``. With a mesh placement (``sharding.place_fn``) every
    array is restored straight into its shards: each device reads only its part of the file, so no
    host or device ever holds a whole tensor it does not own."""
    import orbax.checkpoint as ocp

    path = Path(src)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META_FILE}: unreadable ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format version {meta.get('format_version')}")
    hf_config = meta["hf_config"]
    config = family_for(hf_config.get("model_type")).config_from_hf(hf_config)
    stored = parse_dtype(meta["dtype"])
    sharding = getattr(place, "sharding", None)
    target = map_specs(lambda spec: jax.ShapeDtypeStruct(spec.shape, stored, sharding=sharding and sharding(spec)),
                       family_for(config.model_type).param_specs(config))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path.resolve() / "params", target)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore orbax params ({e})") from None
    held = meta["dtype"]
    if dtype is not None and parse_dtype(dtype) != stored:
        params = jax.tree.map(lambda x: x.astype(parse_dtype(dtype)), params)
        held = dtype_name(parse_dtype(dtype))
    tokenizer_dir = path / "tokenizer"
    return LoadedModel(config=config, params=params, hf_config=hf_config, source=str(path), source_format="orbax",
                       dtype=held, source_dtype=meta.get("source_dtype", held),
                       tokenizer_source=str(tokenizer_dir) if any(tokenizer_dir.iterdir()) else None)
