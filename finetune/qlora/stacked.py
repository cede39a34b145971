"""Adapter stacks on a 4-bit base: the run chain's adapters loaded together instead of merged, and the DPO reference.

    finetune dpo recipes/mixtral-8x7b/dpo-qlora.yaml    # from_run: an SFT run with model.quantization: nf4
    finetune eval runs/mixtral-8x7b/sft-qlora --data ...

On a 16-bit base each stage's adapter is merged before the next one trains (finetune/load/chain.py).
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
around every loss (before backward too: gradient checkpointing recomputes the policy forward). tests/unit/qlora/test_stacked.py proves it with first-step rewards of 0.
Layer: qlora; imports lora (fast experts), runs, recipe, errors.
"""

from __future__ import annotations

import warnings

from peft import PeftModel

from finetune import runs
from finetune.errors import UserError
from finetune.lora.fast_experts import disable_fast_expert_lora, enable_fast_expert_lora
from finetune.qlora.loading import load_quantized
from finetune.recipe import ModelSection

REF = "ref"


def _adapter_names(dirs) -> list[str]:
    return [f"stage{i}" for i in range(len(dirs))]


def load_stacked(section: ModelSection, dirs, trainable: bool = False, device_map=None):
    """The 4-bit base with every adapter in `dirs` loaded (frozen) and active together, fast path on."""
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
    disable_fast_expert_lora(model)  # a new adapter nests new ParamWrappers; re-patch the outermost
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(sft_dir), adapter_name=REF, is_trainable=False)
    activate_stack(model)
    enable_fast_expert_lora(model)


def stacked_reference_trainer_class():
    from trl import DPOTrainer  # trl imported lazily: validate and --help never need it

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
    check_parent_chain(parent)
    runs.check_adapter_hashes(parent)  # the SFT adapter is the file its chain recorded (sha256)
    return load_quantized(ModelSection(**parent.recipe.model.__dict__))
