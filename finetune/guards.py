"""Training guards: stop a run whose loss or gradients stop being finite numbers.

A NaN LoRA alpha once "trained" a whole SFT run to completion: transformers' Trainer replaces a
non-finite step loss in its logs by the running mean (`logging_nan_inf_filter`, on by default),
so the run logged loss 0.0000 and was marked finished. This TrainerCallback raises
`CheckFailed` (exit status 1) naming the step instead; the exception leaves trainer.train()
before the stage saves anything, so the run is never marked finished.

Attached by `finetune sft` and `finetune dpo` (finetune/stages); test: tests/e2e/test_hostile.py.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from finetune.errors import CheckFailed

# Logged values that must stay finite. `loss` is filtered by the Trainer (see above), the others are not.
WATCHED = ("loss", "grad_norm", "eval_loss", "aux_loss")
HINT = "lower the learning rate, check lora alpha and the data, or use float32"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGuard(TrainerCallback):
    """Raise CheckFailed when the gradients of the step about to be taken, or a logged loss or
    gradient norm, are NaN or infinite."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Runs after backward (and clipping), before optimizer.step(): a non-finite loss shows
        # here as non-finite gradients at the very step it happens, before the weights are hit.
        # (Under DeepSpeed the gradients live in its partitions, not in .grad: on_log covers it.)
        if model is None or getattr(args, "fp16", False):
            # fp16 mixed precision: inf gradients are normal overflow, the GradScaler skips the
            # step and lowers its scale; stopping there would end healthy runs
            return
        # FSDP2: each rank checks its own shard of every gradient (the all-reduce below covers
        # the others); a norm over DTensors would itself be a DTensor that c10d cannot reduce.
        grads = [_local(p.grad) for p in model.parameters() if p.requires_grad and p.grad is not None]
        device = grads[0].device if grads else _local(next(model.parameters())).device
        bad = torch.zeros((), device=device)
        if grads:
            # one reduction and one host sync per step, whatever the number of LoRA tensors
            norms = torch._foreach_norm([g.detach() for g in grads])
            bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop together; a rank raising alone would leave the others waiting
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            raise CheckFailed(f"training stopped at step {state.global_step + 1}: the gradients are not finite "
                              f"(NaN or inf loss); nothing was saved. {HINT}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in WATCHED:
            if key == "grad_norm" and getattr(args, "fp16", False):
                continue  # an overflow step logs an inf norm under fp16 (see above)
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise CheckFailed(f"training stopped at step {state.global_step}: {key} is {value}; "
                                  f"nothing was saved. {HINT}")
