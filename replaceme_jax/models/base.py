"""The contract of a model family: what one module in ``replaceme_jax/models/`` provides so that every
pass (capture, held-out validation, evaluation, generation with a KV cache, expert statistics), the
ReplaceMe merge and export work on it unchanged.

A family is a plain module of pure functions over an HF-layout pytree of parameters (``params``) and a
frozen, hashable config dataclass (static under ``jax.jit``). Adding one means: this module, a
declarative weight map in ``conversion/weight_map.py``, one line in ``models/__init__.py`` and its
tests (logits parity against transformers, merged == unmerged + explicit T). ``models/__init__.py``
checks each registered module against ``Family`` when it is imported, so a missing piece fails there,
not deep inside a pass.

How the pieces fit:

- ``config_from_hf(hf_config_dict) -> Config`` refuses unsupported fields in one line
  (``UnsupportedModelError``); ``config_to_hf_updates(config) -> dict`` is what export writes back
  into config.json after layers are removed (``Config.with_layers(kept)``).
- ``param_specs(config)`` declares every parameter with its shape and logical axes
  (``common.ParamSpec``); sharding rules and the Flax NNX module (``modeling.CausalLM``) read them.
- ``attention_context(config, (B, S), attention_mask, positions)`` is built once per batch;
  ``layer_around_attention(layer, config, index, h, attend) -> (h_next, Y, M, aux)`` is THE layer:
  ``attend(attn_params, normed_h) -> (out, aux)`` is the plain attention (``decoder_layer``) or the
  KV-cache one (``generate.forward_cached``), both ``models/attention.attend``. ``Y`` is the residual
  after attention and ``M`` the MLP branch, so ``h_next = Y + M``: the two quantities ReplaceMe fits.
- ``embed``, ``final_norm``, ``lm_head`` and ``forward`` (which runs ``llama.run_layers``, the one
  decoder loop) complete the model; ``qkv_projection(config)`` is the q/k/v projection the cached
  attention calls.
- ``fold_output_map(layer, config, T)`` writes ``M -> M T`` into the layer's weights (MoE: into every
  expert's down_proj); ``realizable_output_map(layer, config, T, A=None, B=None)`` is the map that
  fold actually writes (T itself where ``FOLDS_ANY_OUTPUT_MAP``; Gemma's post-MLP norm allows only
  ``diag(g)^-1 Q diag(s)``, fitted on the normal equations A, B when given).
- ``MODEL_TYPES``: the HF ``model_type`` values the module serves.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Family(Protocol):
    MODEL_TYPES: tuple[str, ...]
    FOLDS_ANY_OUTPUT_MAP: bool

    def config_from_hf(self, hf_config: dict) -> Any: ...
    def config_to_hf_updates(self, config) -> dict: ...
    def param_specs(self, config) -> dict: ...
    def attention_context(self, config, input_shape, attention_mask=None, positions=None) -> Any: ...
    def qkv_projection(self, config): ...
    def layer_around_attention(self, layer: dict, config, layer_index: int, h, attend) -> tuple: ...
    def decoder_layer(self, layer: dict, config, layer_index: int, h, ctx) -> tuple: ...
    def embed(self, params, input_ids): ...
    def final_norm(self, params, config, h): ...
    def lm_head(self, params, config, normed): ...
    def forward(self, params, config, input_ids, attention_mask=None, positions=None, **kwargs) -> Any: ...
    def fold_output_map(self, layer: dict, config, T: np.ndarray) -> dict: ...
    def realizable_output_map(self, layer: dict, config, T: np.ndarray, A=None, B=None) -> np.ndarray: ...


# every constant and function the protocol names
REQUIRED = tuple(Family.__annotations__) + tuple(
    name for name, value in vars(Family).items() if callable(value) and not name.startswith("_"))


def check_family(module: ModuleType) -> ModuleType:
    """``module`` if it provides every piece of ``Family``; else a TypeError naming what is missing."""
    missing = sorted(name for name in REQUIRED if not hasattr(module, name))
    if missing:
        raise TypeError(f"model family {module.__name__} lacks {', '.join(missing)} (see models/base.py)")
    return module
