"""The ``experts`` command's YAML config (same loader as ``compress``: unknown keys and wrong types
are one-line errors)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from replaceme_jax.config import check_dataset
from replaceme_jax.errors import UsageError


@dataclasses.dataclass
class ExpertsConfig:
    method: Literal["frequency", "ean", "reap", "ream"] = "reap"
    model_path: str = ""
    num_experts: int | None = None  # experts kept per layer ...
    compression_ratio: float | None = None  # ... or the fraction removed: N - int(N * ratio) kept
    group_size: int = 16  # REAM's C (centroid included); 0: every dropped expert joins its nearest centroid
    # local file (json/jsonl/parquet/csv/txt), hub data set, "self" (sampled from the model), or a
    # mixture: [{dataset: ..., ratio: ...}, ...] (see ``replaceme_jax.data.parse_mixture``)
    dataset: str | list = ""
    dataset_column: str = "text"
    dataset_subset: str | None = None  # the split to read
    dataset_size: int = 128
    batch_size: int = 8
    max_length: int = 512
    save_path: str = ""
    seed: int = 0
    overwrite: bool = False
    # --- finer control ---
    dtype: str | None = None  # compute dtype (default: the checkpoint's)
    save_dtype: str | None = None  # dtype of the exported model (default: the checkpoint's)
    saliency: Literal["reap", "frequency", "ean"] = "reap"  # REAM's centroid ranking and merge weights
    sequential: bool | None = None  # recompute a layer's outputs after compressing it (default: REAM only)
    # tokens sampled per layer: REAM compares and aligns experts on them; every method reports its
    # per-layer reconstruction error on them (0: no sample, no error figure)
    sample_tokens: int = 32768
    router_similarity: Literal["reference", "cosine"] = "reference"
    output_similarity: Literal["mean", "token_mean"] = "mean"
    alignment: Literal["activation+weight", "activation", "weight", "none"] = "activation+weight"
    pca_dim: int = 64
    dispatch: Literal["auto", "dense", "ragged"] = "auto"
    bucket: Literal["pow2", "longest"] | int = "pow2"
    # device mesh for the calibration passes, as for compress: {data: 4, fsdp: 1, tensor: 2}; default:
    # every device on data (batch_size must be a multiple of data x fsdp)
    mesh: dict | None = None
    chat_format: Literal["slimorca"] | None = None
    self_temperature: float = 0.8  # dataset: self (as for compress)
    self_top_k: int | None = None
    self_top_p: float | None = 0.95
    self_batch_size: int = 32
    # Prune by the saliency stored in an earlier run's experts_recipe.json (any ratio, no calibration).
    recipe_path: str | None = None

    def validate(self) -> "ExpertsConfig":
        for name in ("model_path", "save_path"):
            if not getattr(self, name):
                raise UsageError(f"config key {name!r} is required")
        if self.recipe_path and self.method == "ream":
            raise UsageError("config key 'recipe_path' works with the pruning methods; REAM needs calibration data")
        if not self.recipe_path:
            check_dataset(self.dataset, self.dataset_size)
        if (self.num_experts is None) == (self.compression_ratio is None):
            raise UsageError("give exactly one of config keys 'num_experts' and 'compression_ratio'")
        if self.compression_ratio is not None and not 0 <= self.compression_ratio < 1:
            raise UsageError(f"config key 'compression_ratio' must be in [0, 1) (got {self.compression_ratio})")
        for name in ("dataset_size", "batch_size", "max_length", "pca_dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"config key {name!r} must be >= 1 (got {getattr(self, name)})")
        if self.num_experts is not None and self.num_experts < 1:
            raise UsageError(f"config key 'num_experts' must be >= 1 (got {self.num_experts})")
        if self.group_size < 0 or self.sample_tokens < 0:
            raise UsageError("config keys 'group_size' and 'sample_tokens' must be >= 0")
        if self.method == "ream" and self.sample_tokens < 1:
            raise UsageError("config key 'sample_tokens' must be >= 1 for method ream")
        return self

    @property
    def is_sequential(self) -> bool:
        return self.method == "ream" if self.sequential is None else self.sequential
