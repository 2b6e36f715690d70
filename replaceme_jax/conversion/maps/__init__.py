"""One declarative weight map per architecture family."""

from replaceme_jax.conversion.maps import gemma, llama, moe

WEIGHT_MAPS = {model_type: llama.WEIGHT_MAP for model_type in ("llama", "mistral", "qwen2", "qwen3")}
WEIGHT_MAPS.update(moe.WEIGHT_MAPS)
WEIGHT_MAPS.update({model_type: gemma.WEIGHT_MAP for model_type in ("gemma2", "gemma3_text")})
# llama.cpp writes Mixtral as arch "llama" with an expert count, so "llama" reads expert tensors too.
GGUF_NAME_MAPS = {arch: llama.GGUF_NAMES for arch in ("mistral", "qwen2", "qwen3")}
GGUF_NAME_MAPS.update({arch: moe.GGUF_NAMES for arch in ("llama", "qwen2moe", "qwen3moe")})
GGUF_NAME_MAPS.update({arch: gemma.GGUF_NAMES for arch in ("gemma2", "gemma3")})
