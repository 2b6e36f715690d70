"""Declarative HF <-> params key maps, used in both directions.

A map is a tuple of :class:`WeightRule`. ``{i}`` in a pattern stands for a layer index and
``{name}`` for one of the rule's ``choices``; the same placeholders appear in the HF key and the
parameter path, so one rule converts a key in either direction.
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
    transform: str = "copy"  # "transpose": torch [out, in] <-> Flax kernel [in, out]
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform}")

    def _regex(self, pattern: str) -> re.Pattern:
        escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
        if self.choices:
            escaped = escaped.replace(r"\{name\}", "(?P<name>" + "|".join(map(re.escape, self.choices)) + ")")
        return re.compile("^" + escaped + "$")

    def match_hf(self, key: str) -> dict | None:
        m = self._regex(self.hf_key).match(key)
        return m.groupdict() if m else None

    def match_param(self, path: str) -> dict | None:
        m = self._regex(self.param_path).match(path)
        return m.groupdict() if m else None


def to_params_layout(rule: WeightRule, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T) if rule.transform == "transpose" else array


def to_hf_layout(rule: WeightRule, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T) if rule.transform == "transpose" else array


def hf_key_to_param(rules: Iterable[WeightRule], key: str) -> tuple[WeightRule, str] | None:
    for rule in rules:
        fields = rule.match_hf(key)
        if fields is not None:
            return rule, rule.param_path.format(**fields)
    return None


def param_to_hf_key(rules: Iterable[WeightRule], path: str) -> tuple[WeightRule, str]:
    for rule in rules:
        fields = rule.match_param(path)
        if fields is not None:
            return rule, rule.hf_key.format(**fields)
    raise CheckpointError(f"no weight-map rule for parameter {path}")


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
