"""Measured side of the planner's proofs: bytes saved for backward, and a random model to run.

`saved_bytes` wraps one training forward+backward in `torch.autograd.graph.saved_tensors_hooks`
and keeps the live total of saved tensors (deduplicated by storage, parameters and buffers left
out): its maximum is the activation memory the step held. Checkpointed runs use reentrant
checkpoints here: they save the layer inputs and recompute under the same hooks, so the
recomputed layer is counted; TRL's default (non-reentrant) holds the same tensors but recomputes
under hooks of its own that these cannot see.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.expert_lora import enable_fast_expert_lora
from finetune.lora import lora_config, plan_targets
from finetune.modeling import is_moe
from finetune.recipe import LoraGroup, LoraSection, RouterSection


def random_config(model_type: str, **sizes):
    return AutoConfig.for_model(model_type, **sizes)


def lora_section(moe: bool, r: int = 8) -> LoraSection:
    return LoraSection(attention=LoraGroup(r=r), experts=LoraGroup(r=r) if moe else None,
                       mlp=None if moe else LoraGroup(r=r))


def wrapped_model(config, attn: str, dtype=torch.float32, r: int = 8, meta: bool = False):
    """(plan, model): the model with this project's LoRA, as the SFT stage wraps it."""
    moe = is_moe(config)
    with torch.device("meta" if meta else "cpu"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    plan, problems = plan_targets(lora_section(moe, r), RouterSection(), model, moe)
    if problems:
        raise ValueError(problems)
    if meta:
        return plan, model
    model = get_peft_model(model, lora_config(plan))
    if moe:
        enable_fast_expert_lora(model)
    return plan, model


class _Saved:
    def __init__(self, tracker, t):
        self.t, self.tracker = t, tracker
        self.key = t.untyped_storage().data_ptr()
        tracker.add(self.key, t.untyped_storage().nbytes())

    def __del__(self):
        self.tracker.drop(self.key)


class _Tracker:
    def __init__(self, exclude):
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def add(self, key, nbytes):
        if key in self.exclude:
            return
        if key not in self.live:
            self.live[key] = [0, nbytes]
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        self.live[key][0] += 1

    def drop(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]


def saved_bytes(model, batch: int, seq: int, vocab: int, checkpointing: bool, seed: int = 0) -> int:
    """Peak bytes of tensors saved for backward during one forward+backward of `model`."""
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    tracker = _Tracker(exclude)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(tracker, t), lambda s: s.t):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
    return tracker.peak
