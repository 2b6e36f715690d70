"""One declarative weight map per architecture family."""

from conversion.maps import llama, moe

WEIGHT_MAPS = {model_type: llama.WEIGHT_MAP for model_type in ("llama", "mistral", "qwen2", "qwen3")}
WEIGHT_MAPS.update(moe.WEIGHT_MAPS)
GGUF_NAME_MAPS = {arch: llama.GGUF_NAMES for arch in ("llama", "mistral", "qwen2", "qwen3")}
