"""LoRA on MoE models: targets per group (targets.py), grouped GEMMs over tokens sorted by expert
(grouped_mm.py), and the fast expert path that applies expert LoRA to activations (fast_experts.py).

    finetune validate recipes/mixtral-8x7b/sft.yaml
Layer: lora (below qlora; imports moe, recipe, errors).
"""

from finetune.lora import peft_compat

# Before any adapter is built or loaded: v5 target names must not be rewritten as v4 ones (peft_compat.py).
peft_compat.install()
