"""Typed run configs: YAML files with the reference tool's key names, ``--set key=value`` overrides,
and a clear error for an unknown key or a wrong type.

Both commands (``compress`` and ``experts``) are built from the same sections, one per concern, so a
key means the same and is checked the same in both:

- ``RunConfig``: the model, where the result goes, the seed and dtypes (top-level keys)
- ``DataConfig``: calibration data (``data:``)
- ``MeshConfig``: the device mesh (``mesh:``, which is itself the mapping of axis sizes)
- a solver section per command (``solver:``): ``ReplaceMeSolver`` here, ``ExpertsSolver`` for ``experts``

YAML keys are flat, as in the reference tool; ``data:`` and ``solver:`` may also be written as nested
mappings (``data: {dataset: c4.jsonl, dataset_size: 256}``), and ``--set data.dataset_size=256``
addresses a key by its section. A key given both flat and nested is an error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml

from replaceme_jax.errors import UsageError


# ---------------------------------------------------------------------------------------------
# Sections shared by the commands. A command may give a key another default (by declaring the field
# again with the same type; tests/test_config.py checks the types agree), never another meaning.


def _at_least_one(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"config key {name!r} must be >= 1 (got {value})")


@dataclasses.dataclass
class RunConfig:
    """The model, where the result goes, the run's seed and dtypes."""

    model_path: str = ""  # HF directory, GGUF file, orbax checkpoint or a built-in name
    save_path: str | None = None  # output directory
    overwrite: bool = False  # replace a non-empty save_path
    seed: int = 0  # held-out split, mixture shuffle, self sampling, solver randomness
    dtype: str | None = None  # compute dtype (default: the checkpoint's)
    save_dtype: str | None = None  # dtype of the exported model (default: the checkpoint's)

    def validate_run(self, required: tuple[str, ...] = ()) -> None:
        for name in required:
            if not getattr(self, name):
                raise UsageError(f"config key {name!r} is required")


@dataclasses.dataclass
class DataConfig:
    """Calibration data (``replaceme_jax.data.calibration_batches`` reads these keys)."""

    # a local file (json/jsonl/parquet/csv/txt) or directory, a hub data set, "self" (sampled from the
    # model), or a mixture: [{dataset: ..., ratio: ...}, ...] (see ``replaceme_jax.data.parse_mixture``)
    dataset: str | list = "self"
    dataset_column: str = "text"
    dataset_subset: str | None = None  # the split to read (the reference's name for it)
    dataset_size: int = 64  # calibration sequences (documents), split by ratio over a mixture
    batch_size: int = 8
    max_length: int = 256  # tokens per sequence (longer texts are truncated)
    chat_format: Literal["slimorca"] | None = None
    bucket: Literal["pow2", "longest"] | int = "pow2"  # batch length buckets ("longest" = the reference's)
    sort_by_length: bool = True  # group similar lengths (less padding); false keeps the data order
    # dataset: self (also as a mixture source)
    self_temperature: float = 0.8  # 0.8 + top-p 0.95 gave fluent SmolLM2 text; 1.0 drifts into noise
    self_top_k: int | None = None
    self_top_p: float | None = 0.95
    self_batch_size: int = 32  # decoding is memory-bound: wider batches are nearly free

    def validate_data(self, dataset_needed: bool = True) -> None:
        _at_least_one(self, ("dataset_size", "batch_size", "max_length", "self_batch_size", "self_top_k"))
        if not isinstance(self.bucket, str) and self.bucket < 1:
            raise UsageError(f"config key 'bucket' must be pow2, longest or a length >= 1 (got {self.bucket})")
        if self.self_temperature < 0:
            raise UsageError(f"config key 'self_temperature' must be >= 0 (got {self.self_temperature})")
        if self.self_top_p is not None and not 0 < self.self_top_p <= 1:
            raise UsageError(f"config key 'self_top_p' must be in (0, 1] (got {self.self_top_p})")
        if dataset_needed:
            check_dataset(self.dataset, self.dataset_size)


@dataclasses.dataclass
class MeshConfig:
    """The device mesh of the calibration passes: axis sizes ``{data: 4, fsdp: 1, tensor: 2}`` (omitted
    axes are 1, one axis may be -1 for "the rest"); default: every device on ``data``. The axis names
    are checked against ``replaceme_jax.sharding.MESH_AXES`` when the mesh is built, before any model
    is loaded."""

    mesh: dict | None = None

    def validate_mesh(self) -> None:
        for axis, size in (self.mesh or {}).items():
            if not isinstance(axis, str) or isinstance(size, bool) or not isinstance(size, int) \
                    or not (size >= 1 or size == -1):
                raise UsageError(f"config key 'mesh': {axis!r} must be an axis name with a size >= 1 or -1 "
                                 f"(got {size!r})")


# ---------------------------------------------------------------------------------------------
# compress / distances


@dataclasses.dataclass
class ReplaceMeSolver:
    """What ReplaceMe removes and how T is fitted, validated and refined (``solver:``)."""

    # --- reference ReplaceMe keys (same names and meaning) ---
    method: Literal["lstsq", "cosine", "uidl"] = "lstsq"
    layers_to_skip: int = 8
    num_A: int = 1
    merge_consecutive: bool = True
    # ridge strength; "auto" picks it per fit from a grid by the error on held-out documents
    alpha: float | Literal["auto"] = "auto"
    diag: bool = False
    loss: Literal["cosine", "mse"] = "cosine"
    accurate: bool = False
    min_distance_layer: int | None = None  # smallest block start considered (the reference ignores it; we honour it)
    # distance: the block of lowest angular distance (the paper); heldout: of the block_candidates lowest,
    # the one whose lstsq map gives the lowest held-out perplexity (one block, num_A: 1); auto: heldout
    # where it can score (lstsq, num_A 1, statistics in one pass, at least block_choice_min_tokens
    # held-out tokens), else distance
    block_choice: Literal["auto", "distance", "heldout"] = "auto"
    block_candidates: int = 4
    # below this the choice costs more than the run (11 scored maps a candidate) for a ranking on
    # a few documents (BENCHMARKS.md, issue 16)
    block_choice_min_tokens: int = 4096
    # remove these blocks instead of choosing them: num_A pairs [start, end) of layers_to_skip layers each, in
    # the original layer numbers (the distances are still measured and reported)
    blocks: list | None = None
    use_4bit: bool = False  # reference option (bitsandbytes on CUDA); not supported here
    solver: Literal["adam"] = "adam"
    two_vectors: bool = False  # reference option; not supported
    thri: bool = False  # reference option; not supported
    # --- ours ---
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
    cosine_l1: float = 0.0  # adds cosine_l1 * sum|T_ij| to the cosine objective (the paper's cosine + L1: 1e-4)
    # refine: kl moves T by a few Adam steps towards the original model's next-token distribution
    # (KL through the layers after the block); kept only if held-out perplexity improves. The default since
    # it improved perplexity and LAMBADA at every depth measured (SmolLM2, n = 4..10; BENCHMARKS.md issue 16),
    # at about the cost of the fit again; none is the reference's (and the faster) fit
    refine: Literal["none", "kl"] = "kl"
    # the best measured on SmolLM2 at n = 8 and 10 (BENCHMARKS.md, issue 16); a refined T that does not
    # lower held-out perplexity is dropped, so a rate too high for another model costs time, not quality
    refine_steps: int = 60
    refine_lr: float = 1e-3
    # calibration tokens the refinement cycles over (at most what there is, and at most refine_steps batches:
    # a step sees one batch)
    refine_tokens: int = 65536
    refine_top_k: int = 64  # teacher tokens kept per position (the rest is one bucket)

    def validate_solver(self) -> None:
        _at_least_one(self, ("layers_to_skip", "num_A", "block_candidates", "block_choice_min_tokens", "cosine_epochs",
                             "cosine_batch_rows", "cosine_max_tokens",
                             "refine_steps", "refine_tokens", "refine_top_k"))
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
        if self.cosine_lr <= 0:
            raise UsageError(f"config key 'cosine_lr' must be > 0 (got {self.cosine_lr})")
        if not 0 <= self.cosine_l1 < float("inf"):
            raise UsageError(f"config key 'cosine_l1' must be >= 0 (got {self.cosine_l1})")
        if self.cosine_l1 and self.method != "cosine":
            raise UsageError("config key 'cosine_l1' applies to method cosine only")
        if self.use_4bit:
            raise UsageError("config key 'use_4bit': 4-bit activation capture is not supported; use dtype: bfloat16")
        for name in ("two_vectors", "thri"):
            if getattr(self, name):
                raise UsageError(f"config key {name!r}: structured transforms are not supported (use diag or full T)")
        if self.block_choice == "heldout":
            if self.num_A != 1:
                raise UsageError("config key 'block_choice: heldout' chooses one block (num_A: 1)")
            if self.validation_fraction == 0 or self.method != "lstsq":
                raise UsageError("config key 'block_choice: heldout' scores lstsq maps on held-out documents: "
                                 "it needs method: lstsq and validation_fraction > 0")
        if self.diag and self.method == "cosine":
            raise UsageError("config key 'diag' applies to method lstsq only")
        if self.blocks is not None:
            self._validate_blocks()

    def _validate_blocks(self) -> None:
        def is_pair(block):
            return isinstance(block, list) and len(block) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in block)

        if not self.blocks or not all(is_pair(block) for block in self.blocks):
            raise UsageError(f"config key 'blocks' must be a list of [start, end] pairs of layer numbers "
                             f"(got {self.blocks!r})")
        if len(self.blocks) != self.num_A:
            raise UsageError(f"config key 'blocks' lists {len(self.blocks)} block(s); set num_A: {len(self.blocks)} "
                             f"(it is {self.num_A})")
        for start, end in self.blocks:
            if start < 1:
                raise UsageError(f"config key 'blocks': [{start}, {end}] starts before layer 1 (layer 0 is kept)")
            # Blocks may differ in size (say 6 + 2 layers); layers_to_skip then sets only the distance profile.
            if end <= start:
                raise UsageError(f"config key 'blocks': [{start}, {end}] holds no layers (end must exceed start)")
        ordered = sorted(self.blocks)
        for (_, end), (start, next_end) in zip(ordered, ordered[1:]):
            if start < end:
                raise UsageError(f"config key 'blocks': [{start}, {next_end}] overlaps the block ending at {end}")
        if self.block_choice == "heldout":
            raise UsageError("config keys 'blocks' and 'block_choice: heldout' both choose the block; give one")


@dataclasses.dataclass
class CompressConfig(ReplaceMeSolver, MeshConfig, DataConfig, RunConfig):
    """The ``compress`` and ``distances`` commands: the shared sections, ReplaceMe's solver keys, and
    the keys below (outputs, multi-host start-up, resumable state)."""

    SOLVER: ClassVar[type] = ReplaceMeSolver

    model_path: str = "smollm2-135m"
    save_path: str | None = "outputs/smollm2-135m-replaceme"  # null: write nothing (Python API use)
    distances_path: str | None = None  # write the distance profile here too (CSV)
    save_transform_only: bool = False  # write transforms.safetensors and the report, not the model
    token: str | None = None  # reference option (hub token); unused offline
    distributed: dict | None = None  # {coordinator_address, num_processes, process_id} or {auto: true}
    # save the streaming state every N batches, or "auto": by time, at most ~5% of a pass; 0: never
    checkpoint_every: int | Literal["auto"] = "auto"

    def validate(self) -> "CompressConfig":
        self.validate_run(required=("model_path",))
        self.validate_data()
        self.validate_mesh()
        self.validate_solver()
        if self.checkpoint_every != "auto" and self.checkpoint_every < 0:
            raise UsageError(f"config key 'checkpoint_every' must be >= 0 or auto (got {self.checkpoint_every})")
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


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def sections(cls) -> dict[str, set[str]]:
    """The nested sections a config class accepts (``data``, and ``solver`` when it has one) and
    their keys. ``mesh:`` is not among them: it already is the mapping of axis sizes."""
    out = {"data": _names(DataConfig)}
    if getattr(cls, "SOLVER", None) is not None:
        out["solver"] = _names(cls.SOLVER)
    return out


def flatten_sections(cls, raw: Mapping[str, Any], source: str = "config") -> dict:
    """``raw`` with its nested sections (``data: {...}``, ``solver: {...}``) merged into the top level.

    A key must belong to the section it is written in, and may not also be given at the top level.
    ``solver: adam`` (a string, the reference tool's key) is a key, not a section."""
    nested, fields = sections(cls), _names(cls)
    is_section = {key: key in nested and (isinstance(value, Mapping) or key not in fields)
                  for key, value in raw.items()}
    flat = {key: value for key, value in raw.items() if not is_section[key]}
    for section, entries in raw.items():
        if not is_section[section]:
            continue
        if not isinstance(entries, Mapping):
            raise UsageError(f"{source}: config section {section!r} must be a mapping of keys to values "
                             f"(got {entries!r})")
        for key, value in entries.items():
            if key not in nested[section]:
                home = next((name for name, keys in nested.items() if key in keys), None)
                hint = (f" (it belongs in section {home!r})" if home else " (it is a top-level key)" if key in fields
                        else did_you_mean(key, nested[section]))
                raise UsageError(f"{source}: unknown config key {key!r} in section {section!r}{hint}")
            if key in flat:
                raise UsageError(f"{source}: config key {key!r} is given twice (at the top level and in section "
                                 f"{section!r})")
            flat[key] = value
    return flat


def from_dict(cls, raw: Mapping[str, Any], source: str = "config"):
    """A validated ``cls`` from flat keys and/or nested sections (see ``flatten_sections``)."""
    raw = flatten_sections(cls, raw, source)
    hints = typing.get_type_hints(cls)
    fields = _names(cls)
    unknown = sorted(set(raw) - fields)
    if unknown:
        known = fields | set(sections(cls))
        raise UsageError(f"{source}: unknown config key {unknown[0]!r}{did_you_mean(unknown[0], known)}")
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
    raw = flatten_sections(cls, raw, source)
    for text in overrides or []:  # an override replaces the file's value, flat or nested
        key, value = parse_override(text)
        raw.update(flatten_sections(cls, _nest(cls, key, value), "--set"))
    return from_dict(cls, raw, source)


def _nest(cls, key: str, value: Any) -> dict:
    """``data.dataset_size`` -> ``{"data": {"dataset_size": value}}``; a plain key as it is."""
    if "." not in key:
        return {key: value}
    section, sub = key.split(".", 1)
    known = sections(cls)
    if section not in known:
        raise UsageError(f"--set {key}: no config section {section!r} (sections: {', '.join(known)})"
                         f"{did_you_mean(section, known)}")
    return {section: {sub: value}}


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
