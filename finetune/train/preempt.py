"""Preemption during training: a signal saves a checkpoint at the next step boundary, on every rank.

    finetune sft RECIPE     # SIGTERM/SIGUSR1/SIGINT while it trains -> checkpoint, `--resume` hint, exit 143/130

finetune/runs/signals.py catches the signal and, while training, only records it. This callback acts
on it at the next optimizer-step boundary: the ranks agree (one all-reduce of [signal, disk too
full] per step, so a signal that reached one rank stops them all and no rank waits in a
collective), then the Trainer's own save runs on every rank (DDP, FSDP2 and ZeRO-3 alike) and
training stops; train_and_save (finetune/train/save.py) then raises signals.Interrupted.
Before every checkpoint save it also asks runs/diskspace.py whether the checkpoint fits.
Layer: train.
"""

from __future__ import annotations

import signal

import torch
from transformers import TrainerCallback

from finetune.errors import UserError
from finetune.runs import faults, signals


class PreemptionCallback(TrainerCallback):
    """A signal during train(): save a checkpoint at the next step boundary (every rank), then stop."""

    def __init__(self, disk_check=None):
        self.signum: int | None = None
        self.disk_check = disk_check  # () -> UserError | None before a checkpoint save (runs/diskspace.py)

    def on_train_begin(self, args, state, control, **kwargs):
        signals.training(True)

    def on_train_end(self, args, state, control, **kwargs):
        signals.training(False)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        faults.point("mid_step", state.global_step + 1)  # test-only; one dict lookup otherwise

    def on_step_end(self, args, state, control, **kwargs):
        # One all-reduce of [signal received, disk too full] on every rank at every step: the ranks
        # stop, or fail, together; a signal that reached one rank only stops all of them.
        stop = self.signum is not None or signals.pending() is not None
        problem = self.disk_check() if (self.disk_check and (control.should_save or stop)) else None
        flags = torch.tensor([float(stop), float(problem is not None)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1] > 0:
            raise problem or UserError("another rank found too little disk space for the next checkpoint "
                                       "(its log says where); free space and continue with --resume")
        if flags[0] > 0:
            self.signum = self.signum or signals.pending() or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
        return control
