"""Checkpoint formats <-> replaceme_jax params: HF safetensors directories, GGUF files, orbax."""

from replaceme_jax.conversion.export import export_hf
from replaceme_jax.conversion.model_io import LoadedModel, load_model, load_tokenizer
from replaceme_jax.conversion.orbax_io import save_orbax

__all__ = ["LoadedModel", "export_hf", "load_model", "load_tokenizer", "save_orbax"]
