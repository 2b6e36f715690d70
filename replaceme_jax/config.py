"""Typed run configs: YAML files with the reference tool's key names, ``--set key=value`` overrides,
and a clear error for an unknown key or a wrong type."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from replaceme_jax.errors import UsageError


@dataclasses.dataclass
class CompressConfig:
    # --- reference ReplaceMe keys (same names and meaning) ---
    method: Literal["lstsq", "cosine", "uidl"] = "lstsq"
    model_path: str = "smollm2-135m"
    # a data set, "self" (sample from the model), or a mixture: [{dataset: ..., ratio: ...}, ...]
    dataset: str | list = "self"
    dataset_column: str = "text"
    dataset_subset: str | None = None  # the split to read (the reference's name for it)
    dataset_size: int = 64
    batch_size: int = 8
    max_length: int = 256
    layers_to_skip: int = 8
    num_A: int = 1
    merge_consecutive: bool = True
    # ridge strength; "auto" picks it per fit from a grid by the error on held-out documents
    alpha: float | Literal["auto"] = "auto"
    diag: bool = False
    loss: Literal["cosine", "mse"] = "cosine"
    accurate: bool = False
    distances_path: str | None = None  # write the distance profile here too (CSV)
    save_path: str | None = "outputs/smollm2-135m-replaceme"  # null: write nothing (Python API use)
    save_transform_only: bool = False  # write transforms.safetensors and the report, not the model
    min_distance_layer: int | None = None  # smallest block start considered (the reference ignores it; we honour it)
    use_4bit: bool = False  # reference option (bitsandbytes on CUDA); not supported here
    solver: Literal["adam"] = "adam"
    two_vectors: bool = False  # reference option; not supported
    thri: bool = False  # reference option; not supported
    token: str | None = None  # reference option (hub token); unused offline
    # --- ours ---
    seed: int = 0
    dtype: str | None = None  # compute dtype for the capture passes (default: the checkpoint's)
    save_dtype: str | None = None  # dtype of the exported model (default: the checkpoint's)
    chat_format: Literal["slimorca"] | None = None
    self_temperature: float = 0.8  # 0.8 + top-p 0.95 gave fluent SmolLM2 text; 1.0 drifts into noise
    self_top_k: int | None = None
    self_top_p: float | None = 0.95
    self_batch_size: int = 32  # decoding is memory-bound: wider batches are nearly free
    bucket: Literal["pow2", "longest"] | int = "pow2"  # batch length buckets ("longest" = the reference's)
    sort_by_length: bool = True  # group similar lengths (less padding); false keeps the data order
    include_pad_rows: bool = False  # the reference fits pad rows too; set true to reproduce it
    # Position 0 carries SmolLM2's massive activation (an attention sink): fitted with the weight of
    # every other row it wrecks ordinary tokens, left out the map wrecks the sink (BENCHMARKS.md).
    # A number w weights the first-position rows to w times the other rows' energy; "auto" searches
    # w (and alpha: auto) for the lowest held-out perplexity.
    first_token_rows: float | Literal["include", "exclude", "auto"] = "auto"
    normalize_rows: bool = False  # weight rows by 1/||h_end - Y||^2 (massive-activation rows stop dominating)
    # alpha ||T - I||^2 shrinks towards dropping the block (T = I); the reference's ridge is alpha ||T||^2
    ridge_target: Literal["zero", "identity"] = "identity"
    # whole calibration documents held out to validate every fit (at least validation_min_sequences)
    validation_fraction: float = 0.15
    validation_min_sequences: int = 4
    validation_max_tokens: int = 8192  # held-out tokens scored end to end for each candidate T
    # when T does not beat dropping the block on held-out data: write the dropped block (uidl) or T anyway
    fallback: Literal["uidl", "none"] = "uidl"
    alpha_relative: bool = False  # alpha is a fraction of mean(diag(A)) instead of an absolute value
    distance_state: Literal["residual", "reference"] = "residual"
    sequential: bool = True  # fit each later T on the model with earlier blocks already replaced
    one_pass_max_bytes: int = 4 * 1024**3  # gather every candidate's statistics in pass 1 below this size
    cosine_max_tokens: int = 262_144  # rows kept on device for the cosine solver (bounds memory)
    cosine_lr: float = 1e-4
    cosine_epochs: int = 10
    cosine_batch_rows: int = 1024
    cosine_init: Literal["identity", "lstsq"] = "identity"
    # refine: kl moves T by a few Adam steps towards the original model's next-token distribution
    # (KL through the layers after the block); kept only if held-out perplexity improves
    refine: Literal["none", "kl"] = "none"
    refine_steps: int = 100
    refine_lr: float = 1e-4
    refine_tokens: int = 16384  # calibration tokens the refinement cycles over
    refine_top_k: int = 64  # teacher tokens kept per position (the rest is one bucket)
    mesh: dict | None = None  # e.g. {data: 4, fsdp: 1, tensor: 2}; default: every device on data
    distributed: dict | None = None  # {coordinator_address, num_processes, process_id} or {auto: true}
    overwrite: bool = False
    # save the streaming state every N batches, or "auto": by time, at most ~5% of a pass; 0: never
    checkpoint_every: int | Literal["auto"] = "auto"

    def validate(self) -> "CompressConfig":
        positive = ("dataset_size", "batch_size", "max_length", "layers_to_skip", "num_A", "cosine_epochs",
                    "cosine_batch_rows", "cosine_max_tokens", "refine_steps", "refine_tokens", "refine_top_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"config key {name!r} must be >= 1 (got {getattr(self, name)})")
        if self.alpha != "auto" and self.alpha < 0:
            raise UsageError(f"config key 'alpha' must be >= 0 or auto (got {self.alpha})")
        if not 0 <= self.validation_fraction < 1:
            raise UsageError(f"config key 'validation_fraction' must be in [0, 1) (got {self.validation_fraction})")
        if isinstance(self.first_token_rows, float) and not 0 <= self.first_token_rows < float("inf"):
            raise UsageError(f"config key 'first_token_rows' must be include, exclude, auto or a weight >= 0 "
                             f"(got {self.first_token_rows})")
        if self.validation_min_sequences < 1 or self.validation_max_tokens < 1:
            raise UsageError("config keys 'validation_min_sequences' and 'validation_max_tokens' must be >= 1")
        if self.validation_fraction == 0 and self.method != "uidl":
            for key in ("alpha", "first_token_rows"):
                if getattr(self, key) == "auto":
                    raise UsageError(f"config key {key!r}: auto chooses on held-out data; with validation_fraction: 0 "
                                     f"give it a value")
        if self.checkpoint_every != "auto" and self.checkpoint_every < 0:
            raise UsageError(f"config key 'checkpoint_every' must be >= 0 or auto (got {self.checkpoint_every})")
        if self.cosine_lr <= 0:
            raise UsageError(f"config key 'cosine_lr' must be > 0 (got {self.cosine_lr})")
        if self.use_4bit:
            raise UsageError("config key 'use_4bit': 4-bit activation capture is not supported; use dtype: bfloat16")
        for name in ("two_vectors", "thri"):
            if getattr(self, name):
                raise UsageError(f"config key {name!r}: structured transforms are not supported (use diag or full T)")
        if self.diag and self.method == "cosine":
            raise UsageError("config key 'diag' applies to method lstsq only")
        check_dataset(self.dataset, self.dataset_size)
        return self


def check_dataset(dataset: str | list, size: int) -> None:
    """The ``dataset`` key: a name/path, or a mixture whose sources all get a sequence."""
    from replaceme_jax.data import mixture_counts, parse_mixture

    if isinstance(dataset, list):
        mixture_counts([source.ratio for source in parse_mixture(dataset)], size)
    elif not dataset:
        raise UsageError("config key 'dataset' is required")


def _check_type(name: str, value: Any, annotation) -> Any:
    """Coerce/validate ``value`` against a dataclass field annotation; raise UsageError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"config key {name!r} has an invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise UsageError(f"config key {name!r} must be one of {', '.join(map(repr, args))} (got {value!r})")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"config key {name!r} must be true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"config key {name!r} must be an integer (got {value!r})")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"config key {name!r} must be a number (got {value!r})")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"config key {name!r} must be a string (got {value!r})")
    if annotation is dict:
        if isinstance(value, dict):
            return value
        raise UsageError(f"config key {name!r} must be a mapping (got {value!r})")
    if annotation is list:
        if isinstance(value, list):
            return value
        raise UsageError(f"config key {name!r} must be a list (got {value!r})")
    raise TypeError(f"unhandled annotation {annotation} for {name}")


def from_dict(cls, raw: dict, source: str = "config"):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UsageError(f"{source}: unknown config key {unknown[0]!r}{did_you_mean(unknown[0], fields)}")
    values = {name: _check_type(name, value, hints[name]) for name, value in raw.items()}
    return cls(**values).validate()


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    import difflib

    close = difflib.get_close_matches(str(name), sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UsageError(f"--set expects key=value (got {text!r})")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def load_config(cls, path: str | None, overrides: list[str] | None = None):
    raw: dict = {}
    source = "command line"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise UsageError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: a config must be a mapping of keys to values")
        raw.update(loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        raw[key] = value
    return from_dict(cls, raw, source)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
