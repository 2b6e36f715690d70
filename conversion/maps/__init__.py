"""One declarative weight map per architecture family."""

from conversion.maps import llama

WEIGHT_MAPS = {model_type: llama.WEIGHT_MAP for model_type in ("llama", "mistral", "qwen2", "qwen3")}
GGUF_NAME_MAPS = {arch: llama.GGUF_NAMES for arch in ("llama", "mistral", "qwen2", "qwen3")}
