"""Exact resume: find the newest complete Trainer checkpoint of an interrupted run, and carry its totals.

    finetune sft RECIPE --resume      # continues <parent>/.<name>.incomplete/checkpoints/checkpoint-N

The Trainer's own checkpoints (adapter, optimizer, scheduler, RNG state per rank, trainer_state.json
with the data position and log history) make `trainer.train(resume_from_checkpoint=...)` continue
bit for bit. What they leave out is written here, beside them, by RunTotalsCallback: TRL's token
counter and the loss summed before the checkpoint, which the Trainer restarts from zero on resume
(its train_loss then averages only the resumed steps). A checkpoint is complete only when every
file the Trainer writes is there and trainer_state.json and our totals file both parse: a process
killed mid-save leaves one that is skipped, and the log says which checkpoint was taken.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.runs import faults

log = logging.getLogger("finetune")

TOTALS = "finetune_totals.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def incomplete_reason(ckpt: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from, or None when it is complete."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        totals = json.loads((ckpt / TOTALS).read_text())
    except (OSError, ValueError) as exc:
        return f"trainer state unreadable ({exc.__class__.__name__})"
    if state.get("global_step") != int(_CHECKPOINT.match(ckpt.name).group(1)) or "tokens" not in totals:
        return "trainer state does not match the checkpoint"
    world = int(totals.get("world_size", 1))
    rng = ["rng_state.pth"] if world == 1 else [f"rng_state_{i}.pth" for i in range(world)]
    if (ckpt / "pytorch_model_fsdp_0").is_dir():
        # FSDP2 with a sharded state dict: the Trainer saves model and optimizer as distributed
        # checkpoints (one .distcp file per rank, .metadata written last), not the PEFT files.
        for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
            parts = [ckpt / folder / ".metadata", *[ckpt / folder / f"__{i}_0.distcp" for i in range(world)]]
            missing = [p for p in parts if not p.is_file() or p.stat().st_size == 0]
            if missing:
                return f"{folder}/{missing[0].name} missing"
        files = ["scheduler.pt", *rng]
    elif (ckpt / "latest").is_file():
        # DeepSpeed: the Trainer writes the gathered adapter and DeepSpeed's own partitioned model
        # and optimizer states (one file per rank in the directory that `latest` names)
        tag = (ckpt / "latest").read_text().strip()
        files = ["adapter_model.safetensors", "adapter_config.json", "scheduler.pt", *rng,
                 *[f"{tag}/zero_pp_rank_{i}_mp_rank_00_{kind}_states.pt" for i in range(world) for kind in ("model", "optim")]]
    else:
        files = ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", *rng]
    for name in files:
        f = ckpt / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} missing"
    return None


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint-N under `checkpoints`; incomplete ones are skipped with a warning."""
    if not checkpoints.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in checkpoints.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    for _, ckpt in found:
        reason = incomplete_reason(ckpt)
        if reason is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s (written halfway?)", ckpt, reason)
    return None


class RunTotalsCallback(TrainerCallback):
    """Writes the run's running totals into each checkpoint; restores them on resume."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.loss_before = 0.0  # summed per-step loss of the steps done before this train() call
        self.step_before = 0
        self.seconds_before = 0.0  # training wall time of the sessions before, up to the checkpoint resumed from
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def train_seconds(self) -> float:
        """Wall time in train() over the whole run: earlier sessions (to their checkpoint) and this one."""
        return self.seconds_before + time.perf_counter() - self.started

    def on_save(self, args, state, control, **kwargs):
        faults.point("save", state.global_step)  # test-only: a signal while this checkpoint is half written
        if not state.is_world_process_zero:
            return
        t = self.trainer
        # Trainer keeps the per-step loss sum in _total_loss_scalar (drained at each log) plus _tr_loss.
        loss = self.loss_before + t._total_loss_scalar + float(t._tr_loss.item())
        totals = {"tokens": int(getattr(t, "_total_train_tokens", 0)), "loss_sum": loss,
                  "global_step": state.global_step, "world_size": args.world_size, "train_seconds": self.train_seconds()}
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tmp = ckpt / f".{TOTALS}.tmp"
        tmp.write_text(json.dumps(totals))
        tmp.rename(ckpt / TOTALS)  # complete or absent, never half a file

    def restore(self, ckpt: Path) -> None:
        totals = json.loads((ckpt / TOTALS).read_text())
        if hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(totals["tokens"])
        self.loss_before = float(totals["loss_sum"])
        self.step_before = int(totals["global_step"])
        self.seconds_before = float(totals.get("train_seconds", 0.0))  # absent in checkpoints of older versions

    def fix_train_loss(self, state) -> None:
        """After a resumed train(): train_loss over every step of the run, not just the resumed ones."""
        if not self.step_before or not state.log_history or "train_loss" not in state.log_history[-1]:
            return
        entry = state.log_history[-1]
        resumed_steps = state.global_step - self.step_before
        entry["train_loss"] = (self.loss_before + entry["train_loss"] * resumed_steps) / max(state.global_step, 1)
