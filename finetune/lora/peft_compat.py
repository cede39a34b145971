"""PEFT's v4 -> v5 target conversion kept away from adapters whose targets are already v5 names.

    finetune sft RECIPE       # installed on import of finetune.lora, before any adapter is built or loaded

PEFT 0.21 rewrites, for every model type transformers converts from v4 checkpoints (Qwen2-MoE,
DeepSeek-V3, GLM-4-MoE, ...), any target module ending in `gate_proj`/`up_proj`/`down_proj` into
the fused expert parameters (`gate_up_proj`, `down_proj`), so that adapters trained on the v4
per-expert Linears still load. On v5 those names are also real modules: shared experts
(`mlp.shared_expert.gate_proj`) and dense MLP layers (DeepSeek's first layers). Their LoRA was
silently moved onto the experts (found by tests/unit/lora/test_families.py). This project's
targets are resolved against the v5 module tree (finetune/lora/targets.py), so the conversion is
skipped when every target module names a module that exists in the model; anything else (an
adapter made for v4) still goes through PEFT's conversion unchanged.
Layer: lora.
"""

from __future__ import annotations

import functools

from peft.utils import transformers_weight_conversion as conversion


def _all_targets_exist(peft_config, model) -> bool:
    targets = peft_config.target_modules
    if not targets or isinstance(targets, str):
        return False  # a regex or "all-linear": PEFT resolves it itself
    names = [n for n, _ in model.named_modules()]
    return all(any(n == t or n.endswith(f".{t}") for n in names) for t in targets)


def install() -> None:
    """Wrap PEFT's converter once (idempotent)."""
    original = conversion.convert_peft_config_for_transformers
    if getattr(original, "_finetune_wrapped", False):
        return

    @functools.wraps(original)
    def convert(peft_config, model, conversions=None):
        if _all_targets_exist(peft_config, model):
            return None
        return original(peft_config, model, conversions)

    convert._finetune_wrapped = True
    conversion.convert_peft_config_for_transformers = convert
