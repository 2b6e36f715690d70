"""The ``experts`` command's YAML config: the sections shared with ``compress`` (``replaceme_jax.config``:
run, data, mesh) plus the experts solver keys, through the same loader (unknown keys and wrong types
are one-line errors)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from replaceme_jax.config import DataConfig, MeshConfig, RunConfig
from replaceme_jax.errors import UsageError


@dataclasses.dataclass
class ExpertsSolver:
    """Which experts go and how (``solver:``)."""

    method: Literal["frequency", "ean", "reap", "ream"] = "reap"
    num_experts: int | None = None  # experts kept per layer ...
    compression_ratio: float | None = None  # ... or the fraction removed: N - int(N * ratio) kept
    group_size: int = 16  # REAM's C (centroid included); 0: every dropped expert joins its nearest centroid
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
    # Prune by the saliency stored in an earlier run's experts_recipe.json (any ratio, no calibration).
    recipe_path: str | None = None

    def validate_solver(self) -> None:
        if self.recipe_path and self.method == "ream":
            raise UsageError("config key 'recipe_path' works with the pruning methods; REAM needs calibration data")
        if (self.num_experts is None) == (self.compression_ratio is None):
            raise UsageError("give exactly one of config keys 'num_experts' and 'compression_ratio'")
        if self.compression_ratio is not None and not 0 <= self.compression_ratio < 1:
            raise UsageError(f"config key 'compression_ratio' must be in [0, 1) (got {self.compression_ratio})")
        for name in ("num_experts", "pca_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"config key {name!r} must be >= 1 (got {value})")
        if self.group_size < 0 or self.sample_tokens < 0:
            raise UsageError("config keys 'group_size' and 'sample_tokens' must be >= 0")
        if self.method == "ream" and self.sample_tokens < 1:
            raise UsageError("config key 'sample_tokens' must be >= 1 for method ream")


@dataclasses.dataclass
class ExpertsConfig(ExpertsSolver, MeshConfig, DataConfig, RunConfig):
    """The ``experts`` command. ``model_path``, ``save_path`` and (unless ``recipe_path``) ``dataset``
    are required; ``dataset_size`` and ``max_length`` default larger than for ``compress``."""

    SOLVER: ClassVar[type] = ExpertsSolver

    dataset: str | list = ""
    dataset_size: int = 128
    max_length: int = 512

    def validate(self) -> "ExpertsConfig":
        self.validate_run(required=("model_path", "save_path"))
        self.validate_solver()
        self.validate_data(dataset_needed=not self.recipe_path)
        self.validate_mesh()
        return self

    @property
    def is_sequential(self) -> bool:
        return self.method == "ream" if self.sequential is None else self.sequential
