"""Weight maps of the mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe, olmoe).

Two on-disk layouts are read: one tensor per expert (transformers 4.x, and what transformers 5
``save_pretrained`` still writes), and the fused tensors transformers 5 holds in memory
(``mlp.experts.gate_up_proj`` ``[E, 2I, D]``, ``mlp.experts.down_proj`` ``[E, D, I]``). Export writes
the per-expert layout, which both versions load. Rule order matters for export: the first rule that
matches a parameter path names its HF key.
"""

from replaceme_jax.conversion.maps import llama
from replaceme_jax.conversion.weight_map import WeightRule

_PROJ = ("gate_proj", "up_proj", "down_proj")

# Embeddings, norms and attention as in the Llama family (q/k norms of any width included).
_ATTENTION_AND_NORMS = tuple(rule for rule in llama.WEIGHT_MAP if ".mlp." not in rule.param_path)

_FUSED = (
    WeightRule("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.gate.kernel", "transpose"),
    WeightRule("model.layers.{i}.mlp.experts.gate_up_proj", "layers.{i}.mlp.experts.{part}.kernel", "transpose",
               parts=("gate_proj", "up_proj"), split_axis=1),
    WeightRule("model.layers.{i}.mlp.experts.down_proj", "layers.{i}.mlp.experts.down_proj.kernel", "transpose"),
    # Stacked gate and up projections ``[E, I, D]`` apart: what a GGUF file holds (ffn_{gate,up}_exps).
    WeightRule("model.layers.{i}.mlp.experts.{name}", "layers.{i}.mlp.experts.{name}.kernel", "transpose",
               choices=("gate_proj", "up_proj")),
)

QWEN_MOE_WEIGHT_MAP = _ATTENTION_AND_NORMS + (
    WeightRule("model.layers.{i}.mlp.experts.{j}.{name}.weight", "layers.{i}.mlp.experts.{name}.kernel",
               "transpose", choices=_PROJ),
    WeightRule("model.layers.{i}.mlp.shared_expert.{name}.weight", "layers.{i}.mlp.shared_expert.{name}.kernel",
               "transpose", choices=_PROJ),
    WeightRule("model.layers.{i}.mlp.shared_expert_gate.weight", "layers.{i}.mlp.shared_expert_gate.kernel",
               "transpose"),
) + _FUSED

# Mixtral's per-expert checkpoints name the block `block_sparse_moe` and the projections w1 (gate),
# w3 (up) and w2 (down); transformers 5 renames both when loading.
MIXTRAL_WEIGHT_MAP = _ATTENTION_AND_NORMS + (
    WeightRule("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.mlp.gate.kernel", "transpose"),
    WeightRule("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", "layers.{i}.mlp.experts.gate_proj.kernel",
               "transpose"),
    WeightRule("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", "layers.{i}.mlp.experts.up_proj.kernel",
               "transpose"),
    WeightRule("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", "layers.{i}.mlp.experts.down_proj.kernel",
               "transpose"),
) + _FUSED

# llama.cpp's MoE tensor names (3-D stacked experts) -> HF-style keys of the maps above.
GGUF_NAMES = llama.GGUF_NAMES + (
    WeightRule("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.mlp.gate.weight"),
    WeightRule("blk.{i}.ffn_{name}_exps.weight", "model.layers.{i}.mlp.experts.{name}_proj", choices=("gate", "up", "down")),
    WeightRule("blk.{i}.ffn_{name}_shexp.weight", "model.layers.{i}.mlp.shared_expert.{name}_proj.weight",
               choices=("gate", "up", "down")),
    WeightRule("blk.{i}.ffn_gate_inp_shexp.weight", "model.layers.{i}.mlp.shared_expert_gate.weight"),
)

WEIGHT_MAPS = {"mixtral": MIXTRAL_WEIGHT_MAP, "qwen2_moe": QWEN_MOE_WEIGHT_MAP, "qwen3_moe": QWEN_MOE_WEIGHT_MAP,
               "olmoe": QWEN_MOE_WEIGHT_MAP}
