"""Declarative HF <-> params key maps, used in both directions.

A map is a tuple of :class:`WeightRule`. ``{i}`` in a pattern stands for a layer index and
``{name}`` for one of the rule's ``choices``; the same placeholders appear in the HF key and the
parameter path, so one rule converts a key in either direction.

Mixture-of-experts checkpoints store one tensor per expert where the params stack them: ``{j}`` in
the HF key only (not the parameter path) marks the tensor as slice ``j`` of the parameter's first
axis. A fused tensor holding several parameters (``gate_up_proj``) names them in ``parts``; such a
rule is read-only (the first rule that matches a parameter path writes it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

from replaceme_jax.errors import CheckpointError

TRANSFORMS = ("copy", "transpose")


@dataclasses.dataclass(frozen=True)
class WeightRule:
    hf_key: str
    param_path: str
    transform: str = "copy"  # "transpose": torch [out, in] <-> Flax kernel [in, out] (last two axes)
    choices: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()  # fused tensor: equal chunks along split_axis fill ``{part}`` = parts[n]
    split_axis: int = 0

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform}")
        if bool(self.parts) != ("{part}" in self.param_path):
            raise ValueError(f"rule {self.hf_key}: parts and {{part}} go together")

    @property
    def stacked(self) -> bool:
        """One HF tensor per index ``j`` of the parameter's first axis (per-expert tensors)."""
        return "{j}" in self.hf_key and "{j}" not in self.param_path

    def _regex(self, pattern: str) -> re.Pattern:
        escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        if self.choices:
            escaped = escaped.replace(r"\{name\}", "(?P<name>" + "|".join(map(re.escape, self.choices)) + ")")
        if self.parts:
            escaped = escaped.replace(r"\{part\}", "(?P<part>" + "|".join(map(re.escape, self.parts)) + ")")
        return re.compile("^" + escaped + "$")

    def param_paths(self, fields: dict) -> list[str]:
        """The parameter path(s) an HF key with these placeholder values fills (one per part)."""
        if self.parts:
            return [self.param_path.format(part=part, **fields) for part in self.parts]
        return [self.param_path.format(**fields)]

    def match_hf(self, key: str) -> dict | None:
        m = self._regex(self.hf_key).match(key)
        return m.groupdict() if m else None

    def match_param(self, path: str) -> dict | None:
        m = self._regex(self.param_path).match(path)
        return m.groupdict() if m else None


def to_params_layout(rule: WeightRule, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(array, -1, -2)) if rule.transform == "transpose" else array


def to_hf_layout(rule: WeightRule, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(array, -1, -2)) if rule.transform == "transpose" else array


def match_hf_key(rules: Iterable[WeightRule], key: str) -> tuple[WeightRule, dict] | None:
    """The first rule matching an HF key, with its placeholder values."""
    for rule in rules:
        fields = rule.match_hf(key)
        if fields is not None:
            return rule, fields
    return None


def hf_key_to_param(rules: Iterable[WeightRule], key: str) -> tuple[WeightRule, str] | None:
    found = match_hf_key(rules, key)
    if found is None:
        return None
    rule, fields = found
    return rule, rule.param_path.format(**fields)


def param_to_hf_keys(rules: Iterable[WeightRule], path: str, shape: tuple[int, ...]
                     ) -> tuple[WeightRule, list[tuple[str, int | None]]]:
    """The rule writing a parameter and its HF key(s): ``(key, None)``, or ``(key, j)`` per slice of a
    stacked parameter."""
    for rule in rules:
        fields = None if rule.parts else rule.match_param(path)
        if fields is not None:
            if rule.stacked:
                return rule, [(rule.hf_key.format(j=j, **fields), j) for j in range(shape[0])]
            return rule, [(rule.hf_key.format(**fields), None)]
    raise CheckpointError(f"no weight-map rule for parameter {path}")


def param_to_hf_key(rules: Iterable[WeightRule], path: str) -> tuple[WeightRule, str]:
    rule, keys = param_to_hf_keys(rules, path, (1,))
    if rule.stacked:
        raise CheckpointError(f"parameter {path} is stacked: it maps to one HF tensor per slice")
    return rule, keys[0][0]


def flatten_params(tree, prefix: str = "") -> dict:
    """Nested dicts/lists -> {"a.0.b": leaf}."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten_params(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten_params(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def set_path(tree, path: str, value) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[parts[-1]] = value


def empty_like_specs(specs):
    """A tree of the same dict/list structure with None leaves, to be filled tensor by tensor."""
    if isinstance(specs, dict):
        return {k: empty_like_specs(v) for k, v in specs.items()}
    if isinstance(specs, list):
        return [empty_like_specs(v) for v in specs]
    return None
