"""Adapter chains on a 4-bit base: stacked adapters instead of merges, and the DPO reference.

    finetune dpo recipes/mixtral-8x7b/dpo-qlora.yaml    # from_run: an SFT run with model.quantization: nf4
    finetune eval runs/mixtral-8x7b/sft-qlora --data ...

On a 16-bit base each stage's adapter is merged before the next one trains (finetune/chain.py).
A 4-bit base cannot take a merge exactly (W + dW would be re-quantized), so here the earlier
adapters stay loaded, unmerged and frozen, and are active together with the new one; their
deltas add, exactly as a merge would. LoRA deltas do not depend on W, so at export the same
adapters merge, in order, into the original 16-bit base: W + dSFT + dDPO either way.

DPO: TRL 1.16 computes the reference with `use_adapter(model, "ref")` when the PeftModel has an
adapter named "ref" (its own convention for re-training an existing adapter), else with every
adapter disabled (the 4-bit *base*, the wrong reference here). So the SFT adapter is loaded
under the name "ref", frozen: the reference is base + SFT, the policy base + SFT + DPO. TRL's
`use_adapter` restores only the previously active *single* adapter when it exits, which would
drop the SFT adapter from the policy; `StackedReferenceDPOTrainer` re-activates the stack
around every loss (before backward too: gradient checkpointing recomputes the policy forward). tests/test_qlora_stages.py proves it with first-step rewards of 0.
"""

from __future__ import annotations

import warnings

from peft import PeftModel

from finetune import modeling
from finetune.qlora.loading import load_quantized
from finetune.errors import UserError
from finetune.recipe import ModelSection

REF = "ref"


def _adapter_names(dirs) -> list[str]:
    return [f"stage{i}" for i in range(len(dirs))]


def load_stacked(section: ModelSection, dirs, trainable: bool = False, device_map=None):
    """The 4-bit base with every adapter in `dirs` loaded (frozen) and active together, fast path on."""
    from finetune.expert_lora import enable_fast_expert_lora

    model = load_quantized(section, device_map=device_map)
    names = _adapter_names(dirs)
    for i, (name, path) in enumerate(zip(names, dirs)):
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"{path}: no adapter_config.json; the run chain is incomplete")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about pattern keys it matched on parameters
            if i == 0:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
            else:
                model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    if len(names) > 1:
        model.base_model.set_adapter(names, inference_mode=not trainable)
    enable_fast_expert_lora(model)
    model.eval()
    return model


def check_parent_chain(parent) -> None:
    adapters = [link for link in parent.chain if link["kind"] != "base"]
    if len(adapters) != 1:
        raise UserError(f"from_run: {parent.path} has a chain of {len(adapters)} adapters; 4-bit DPO starts from one "
                        "SFT run (its adapter becomes the frozen reference adapter)")


def activate_stack(model) -> None:
    """Policy = frozen reference adapter + the trained `default` one; only `default` trains."""
    if set(model.active_adapters) != {REF, "default"}:
        model.base_model.set_adapter([REF, "default"])
        model.set_requires_grad(REF, requires_grad=False)


def add_reference_adapter(model, sft_dir) -> None:
    """Load the SFT adapter under TRL's reference name, frozen, and stack it under the new adapter."""
    from finetune.expert_lora import disable_fast_expert_lora, enable_fast_expert_lora

    disable_fast_expert_lora(model)  # a new adapter nests new ParamWrappers; re-patch the outermost
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(sft_dir), adapter_name=REF, is_trainable=False)
    activate_stack(model)
    enable_fast_expert_lora(model)


def stacked_reference_trainer_class():
    from trl import DPOTrainer

    class StackedReferenceDPOTrainer(DPOTrainer):
        """DPOTrainer whose policy keeps the frozen `ref` (SFT) adapter active under the trained one."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            peft_model = self.accelerator.unwrap_model(self.model)
            activate_stack(peft_model)
            try:
                return super().compute_loss(model, inputs, *args, **kwargs)
            finally:
                # before backward: gradient checkpointing recomputes the policy forward then, and
                # must see the same adapters as the forward did (TRL's reference pass left `default` alone)
                activate_stack(peft_model)

    return StackedReferenceDPOTrainer


def load_base_for_dpo(parent):
    from finetune import runs

    check_parent_chain(parent)
    runs.verify_adapters(parent)  # the SFT adapter is the file its chain recorded (sha256)
    return load_quantized(ModelSection(**parent.recipe.model.__dict__))


def is_quantized(section) -> bool:
    return getattr(section, "quantization", "none") == "nf4"



# A 16-bit export of a 4-bit run differs from the trained 4-bit model by the base's quantization
# error, which the adapters neither add nor remove (their deltas do not depend on W). So the
# tolerance is measured, not fixed: the base model's own 4-bit vs 16-bit gap on the same probe.
# The exported model may differ from the 4-bit chain by at most GAP_FACTOR times that gap (the
# adapters change activations, so the propagated error changes a little) plus GAP_SLACK.
GAP_FACTOR, GAP_SLACK = 2.0, 1e-3


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def check_against_4bit(run, probe, exported_logits) -> dict:
    """Compare the 16-bit export with the 4-bit adapter chain it was trained as; CheckFailed if too far."""
    from finetune.chain import adapter_dirs, probe_logits
    from finetune.errors import CheckFailed

    section = ModelSection(**{**run.recipe.model.__dict__})
    quant = load_stacked(section, adapter_dirs(run))
    chain4 = probe_logits(quant, probe)
    with quant.disable_adapter():
        base4 = probe_logits(quant, probe)
    del quant
    plain = modeling.load_model(ModelSection(**{**section.__dict__, "quantization": "none", "dtype": "float32"}))
    base16 = probe_logits(plain.eval(), probe)
    del plain
    gap, error = relative(base4, base16), relative(chain4, exported_logits)
    tolerance = GAP_FACTOR * gap + GAP_SLACK
    if not error <= tolerance:
        raise CheckFailed(
            f"export check failed: the merged 16-bit checkpoint's logits differ from the 4-bit adapter chain it was "
            f"trained as by {error:.3e} (relative), above {tolerance:.3e} = {GAP_FACTOR:g} x the base model's own "
            f"4-bit vs 16-bit gap ({gap:.3e}) + {GAP_SLACK:g}"
        )
    return {"nf4_chain_relative_error": error, "nf4_base_gap": gap, "nf4_tolerance": tolerance}


def parameter_target_problems(recipe, plan, model, moe) -> list:
    """4-bit DPO stacks its adapter on the SFT one, and PEFT allows several adapters on raw
    parameters (target_parameters: experts, router LoRA) only if they all target the same ones."""
    from finetune import runs
    from finetune.errors import Problem
    from finetune.lora import lora_config, plan_targets

    if recipe.model.quantization != "nf4" or not recipe.from_run:
        return []
    try:
        parent = runs.read_run(recipe.from_run)
    except UserError:
        return []  # reported already
    parent_plan, _ = plan_targets(parent.recipe.lora, parent.recipe.router, model, moe)
    theirs = sorted(lora_config(parent_plan).target_parameters or [])
    mine = sorted(lora_config(plan).target_parameters or [])
    if mine == theirs:
        return []
    return [Problem("lora", f"with a 4-bit base the SFT adapter stays loaded beside the DPO adapter, and PEFT needs both "
                    f"to put LoRA on the same raw parameters: the SFT run has {theirs}, this recipe {mine}; use the "
                    "SFT run's lora.experts targets and router.policy")]
