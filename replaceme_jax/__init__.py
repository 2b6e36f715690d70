"""replaceme_jax: training-free compression of LLMs (ReplaceMe depth pruning, MoE expert pruning) in JAX."""

__version__ = "0.1.0"
