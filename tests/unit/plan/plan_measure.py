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

from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.lora.targets import lora_config, resolve_targets
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
    plan, problems = resolve_targets(lora_section(moe, r), RouterSection(), model, moe)
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


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_of_training(sizes: dict, batch: int, seq: int, steps: int = 2) -> dict:
    """Run in a fresh process: peak RSS (VmHWM) of LoRA training steps on a random float32
    Mixtral-architecture model, minus the RSS after imports; and the plan's CPU variant."""
    import gc

    from finetune.plan.memory import Setup, estimate
    from finetune.plan.shapes import model_shape

    gc.collect()
    baseline = _vm("VmRSS")
    config = random_config("mixtral", **sizes)
    plan, model = wrapped_model(config, "sdpa")
    built = _vm("VmHWM") - baseline
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = _vm("VmHWM") - baseline
    _, meta = wrapped_model(config, "sdpa", meta=True)
    shape = model_shape(config, meta, plan)
    setup = Setup(batch=batch, seq=seq, dtype_bytes=4, lora_bytes=4, kernel="sdpa", checkpointing=False,
                  dpo=False, nf4=False, world=1, cuda=False)
    e = estimate(shape, setup, "one process")
    return {"measured": measured, "after_build": built, "planned": e.peak, "parts": e.parts, "params": shape.total_params}


if __name__ == "__main__":  # python tests/unit/plan/plan_measure.py '{"hidden_size": ...}' BATCH SEQ
    import json
    import sys

    torch.set_num_threads(1)
    print(json.dumps(rss_of_training(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
