"""replaceme_jax: training-free compression of LLMs (ReplaceMe depth pruning, MoE expert pruning) in JAX.

The Python API (see ``replaceme_jax.api``)::

    import replaceme_jax as rj
    model = rj.from_pretrained("smollm2-135m")       # flax.nnx.Module (CausalLM)
    result = rj.compress(model, texts, layers_to_skip=8)
    rj.save_pretrained(result.module(), "out/")
"""

__version__ = "0.1.0"

_API = {"from_pretrained", "save_pretrained", "compress", "distances", "evaluate", "compress_experts"}

__all__ = sorted(_API | {"CausalLM", "__version__"})


def __getattr__(name):
    # Imported on first use: `import replaceme_jax` (the CLI's first step) stays free of JAX and Flax.
    if name in _API:
        from replaceme_jax import api

        return getattr(api, name)
    if name == "CausalLM":
        from replaceme_jax.modeling import CausalLM

        return CausalLM
    raise AttributeError(f"module 'replaceme_jax' has no attribute {name!r}")
