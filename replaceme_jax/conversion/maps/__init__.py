"""One declarative weight map per architecture family."""

from replaceme_jax.conversion.maps import llama, moe

WEIGHT_MAPS = {model_type: llama.WEIGHT_MAP for model_type in ("llama", "mistral", "qwen2", "qwen3")}
WEIGHT_MAPS.update(moe.WEIGHT_MAPS)
# llama.cpp writes Mixtral as arch "llama" with an expert count, so "llama" reads expert tensors too.
GGUF_NAME_MAPS = {arch: llama.GGUF_NAMES for arch in ("mistral", "qwen2", "qwen3")}
GGUF_NAME_MAPS.update({arch: moe.GGUF_NAMES for arch in ("llama", "qwen2moe", "qwen3moe")})
