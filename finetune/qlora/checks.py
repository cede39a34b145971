"""What a recipe with `model.quantization: nf4` must not combine with (finetune/validate reports
these with the rest of a recipe's problems).

    finetune validate recipes/mixtral-8x7b/sft-qlora.yaml
Layer: qlora; imports lora (targets), distributed, runs, errors.
"""

from __future__ import annotations

from finetune import distributed, runs
from finetune.errors import Problem, UserError
from finetune.lora.targets import lora_config, resolve_targets
from finetune.qlora.experts import STOCK_PATH, refuse_unserved_experts
from finetune.qlora.nf4 import require_bitsandbytes


def recipe_problems(recipe, own_model=None) -> list:
    """What a recipe with `model.quantization: nf4` must not combine with (finetune/validate
    reports these with the rest). `own_model`: a DPO recipe's own model section, before it
    inherited the SFT run's (DPO trains on the base exactly as SFT loaded it)."""
    problems = []
    if own_model is not None and own_model.quantized and not recipe.model.quantized:
        problems.append(Problem("model.quantization", "nf4, but the SFT run in from_run trained on a 16-bit base; "
                                "DPO uses the SFT run's base as it was: run SFT with model.quantization: nf4, or remove the key"))
    if not recipe.model.quantized:
        return problems
    try:
        require_bitsandbytes()
    except UserError as exc:
        problems.append(Problem("model.quantization", str(exc).split(": ", 1)[1]))
    if recipe.lora.expert_path == "peft":
        problems.append(Problem("lora.expert_path", STOCK_PATH))
    if distributed.requested():  # the launcher asked for FSDP or DeepSpeed
        problems.append(Problem("model.quantization", f"nf4 under {distributed.requested()} sharding is not implemented (the NF4 "
                                "expert buffers and bitsandbytes' 4-bit weights are not sharded by it); train on one "
                                "GPU or with DDP (recipes/accelerate/ddp.yaml)"))
    if recipe.router.policy == "train":
        problems.append(Problem("router.policy", "`train` is not available with model.quantization: nf4: 4-bit DPO keeps "
                                "the SFT adapter loaded beside the new one, and PEFT's modules_to_save router copy "
                                "(what `train` saves) cannot be active for two adapters at once; use `lora` or `freeze`"))
    return problems


def parameter_target_problems(recipe, targets, model, moe) -> list:
    """Checks against the (meta) model: its experts must be ones the fast expert path serves (4-bit
    experts run nowhere else); and 4-bit DPO stacks its adapter on the SFT one, and PEFT allows
    several adapters on raw parameters (target_parameters: experts, router LoRA) only if they all
    target the same ones."""
    if not recipe.model.quantized:
        return []
    try:
        refuse_unserved_experts(model)
    except UserError as exc:
        return exc.problems
    if not isinstance(recipe.from_run, str) or not recipe.from_run:  # from_model or a wrong type (reported)
        return []
    try:
        parent = runs.read_run(recipe.from_run)
    except UserError:
        return []  # reported already
    parent_plan, _ = resolve_targets(parent.recipe.lora, parent.recipe.router, model, moe)
    theirs = sorted(lora_config(parent_plan).target_parameters or [])
    mine = sorted(lora_config(targets).target_parameters or [])
    if mine == theirs:
        return []
    return [Problem("lora", f"with a 4-bit base the SFT adapter stays loaded beside the DPO adapter, and PEFT needs both "
                    f"to put LoRA on the same raw parameters: the SFT run has {theirs}, this recipe {mine}; use the "
                    "SFT run's lora.experts targets and router.policy")]
