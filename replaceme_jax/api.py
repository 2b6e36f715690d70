"""The Python API: what the CLI does, callable on models and data already in memory.

    import replaceme_jax as rj

    model = rj.from_pretrained("smollm2-135m")          # flax.nnx.Module, HF-layout parameters
    result = rj.compress(model, ["some text", ...], layers_to_skip=8)
    pruned = result.module()                            # the pruned model, another CausalLM
    rj.save_pretrained(pruned, "out/")                  # an HF directory transformers loads
    rj.evaluate(["smollm2-135m", "out/"], ["wikitext2"], limit=8)

Every keyword of ``compress``/``distances``/``compress_experts`` is a config key of the matching
CLI command (``replaceme_jax.config.CompressConfig``, ``replaceme_jax.experts.config.ExpertsConfig``),
checked the same way: an unknown key or a wrong type raises ``UsageError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from replaceme_jax.config import CompressConfig, from_dict
from replaceme_jax.conversion import LoadedModel, export_hf, load_model
from replaceme_jax.errors import UsageError
from replaceme_jax.modeling import CausalLM

ModelLike = Union[str, Path, LoadedModel, CausalLM]
# A dataset spec as in a config (file, hub name, "self", a mixture), texts, or token-id sequences.
DataLike = Union[str, Sequence[str], Sequence[Sequence[int]], Sequence[np.ndarray], None]


def from_pretrained(src: str | Path, dtype: str | None = None) -> CausalLM:
    """An HF directory, a GGUF file, an orbax checkpoint of this tool, or a built-in name
    (``smollm2-135m``) as a ``CausalLM`` (``flax.nnx.Module``). ``dtype`` (``float32``,
    ``bfloat16``, ``float16``): the dtype to hold the parameters in; default float32."""
    return CausalLM.from_loaded(load_model(str(src), dtype=dtype or "float32"))


def save_pretrained(module: CausalLM | LoadedModel, dst: str | Path, dtype: str | None = None, *,
                    overwrite: bool = False) -> Path:
    """Write an HF directory (safetensors, config.json, tokenizer) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads; written atomically. ``dtype``
    defaults to the source checkpoint's."""
    loaded = module.to_loaded() if isinstance(module, CausalLM) else module
    return export_hf(loaded, dst, dtype=dtype, overwrite=overwrite)


def _as_loaded(model: ModelLike) -> tuple[LoadedModel | None, str]:
    if isinstance(model, CausalLM):
        loaded = model.to_loaded()
        return loaded, loaded.source
    if isinstance(model, LoadedModel):
        return model, model.source
    return None, str(model)


def _dataset_spec(data: DataLike):
    """``data`` as a config's ``dataset`` value when it is one (a spec, a mixture or None for the
    config's default); ``NotImplemented`` when it is texts or token ids, given in memory."""
    if data is None or isinstance(data, str):
        return data
    if isinstance(data, Path):
        return str(data)
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        return list(data)
    return NotImplemented


def _in_memory_sequences(data, loaded: LoadedModel | None, model_label: str, tokenizer, cfg: CompressConfig):
    """(token sequences, tokenizer, model): texts are tokenised with ``tokenizer`` or the model's own,
    loading the model here (once: the pipeline then uses it) when only its path is known."""
    items = list(data)
    if not items:
        raise UsageError("calibration data is empty")
    if all(isinstance(t, str) for t in items):
        from replaceme_jax.conversion import load_tokenizer
        from replaceme_jax.data import tokenize_texts

        if tokenizer is None:
            if loaded is None:
                loaded = load_model(model_label, dtype=cfg.dtype)
            tokenizer = load_tokenizer(loaded)
        return tokenize_texts(tokenizer, items, cfg.max_length), tokenizer, loaded
    try:
        sequences = [np.asarray(s, dtype=np.int32).reshape(-1)[:cfg.max_length] for s in items]
    except (TypeError, ValueError) as e:
        raise UsageError(f"calibration data must be texts or token-id sequences ({e})") from None
    return [s for s in sequences if len(s)], tokenizer, loaded


def _compress_config(model_label: str, dataset, options: dict) -> CompressConfig:
    raw = {"model_path": model_label, "save_path": None, **options}
    if dataset is not None:
        raw["dataset"] = dataset
    return from_dict(CompressConfig, raw, source="compress()")


def compress(model: ModelLike, data: DataLike = None, *, tokenizer=None, distances_only: bool = False,
             **options):
    """ReplaceMe on ``model`` with calibration ``data``; returns a ``CompressResult``
    (``.module()`` the pruned ``CausalLM``, ``.report``, ``.blocks`` with each T, ``.distances``).

    ``data``: a dataset spec as in a config (a file, a hub name, ``"self"``, a mixture list), a list
    of texts (tokenised with ``tokenizer`` or the model's own), or a list of token-id sequences.
    Nothing is written unless ``save_path=`` is given. Options are ``compress`` config keys
    (``layers_to_skip``, ``method``, ``dataset_size``, ``max_length``, ...).
    """
    from replaceme_jax.replaceme.pipeline import compress as run

    loaded, label = _as_loaded(model)
    spec = _dataset_spec(data)
    cfg = _compress_config(label, None if spec is NotImplemented else spec, options)  # bad options fail first
    sequences = None
    if spec is NotImplemented:
        sequences, tokenizer, loaded = _in_memory_sequences(data, loaded, label, tokenizer, cfg)
    return run(cfg, distances_only=distances_only, model=loaded, sequences=sequences, tokenizer=tokenizer)


def distances(model: ModelLike, data: DataLike = None, *, tokenizer=None, **options) -> dict[int, float]:
    """Angular distance of every candidate block of ``layers_to_skip`` layers: ``{start: distance}``."""
    return compress(model, data, tokenizer=tokenizer, distances_only=True, **options).distances


def evaluate(models: Sequence[str | Path], tasks: str | Sequence[str], *, reference: str | Path | None = None,
             mesh: dict[str, int] | None = None, **options) -> dict:
    """Score saved models (paths or built-in names) on tasks, as ``replaceme-jax evaluate``; returns
    the report dict (``options``: ``limit``, ``max_length``, ``batch_size``, ``data_dir``, ``output``,
    ``generate``, ``max_new_tokens``). ``reference``: a model with the same tokenizer; every scoring task
    then adds ``kl`` (mean KL(reference || model) per scored token) and ``top1_agreement``. ``mesh``: axis
    sizes (``{"data": 4, "tensor": 2}``, as the ``mesh`` config key): the models are sharded and the
    batches split over the devices (default: one device)."""
    from replaceme_jax.evaluation import run_evaluation

    return run_evaluation([str(m) for m in models], tasks, reference=None if reference is None else str(reference),
                          mesh=mesh, **options)


def compress_experts(model: str | Path, data: DataLike = None, **options):
    """MoE expert pruning or merging (``method``: frequency, ean, reap, ream), as ``replaceme-jax
    experts``; ``data`` is a dataset spec; ``save_path=`` is required (the result is written).
    Returns the experts pipeline's result (``.model``, ``.report``, ``.recipe``)."""
    from replaceme_jax.experts.config import ExpertsConfig
    from replaceme_jax.experts.pipeline import compress_experts as run

    raw = {"model_path": str(model), **options}
    if data is not None:
        if not isinstance(data, (str, list)) or (isinstance(data, list) and data and not isinstance(data[0], dict)):
            raise UsageError("compress_experts takes a dataset spec (file, hub name, 'self' or a mixture)")
        raw["dataset"] = data
    return run(from_dict(ExpertsConfig, raw, source="compress_experts()"))


__all__ = ["from_pretrained", "save_pretrained", "compress", "distances", "evaluate", "compress_experts"]
