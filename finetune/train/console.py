"""A readable console while training: one compact line per logging step, once (rank 0).

    finetune sft recipes/tiny-moe/sft.yaml      # step 10/120  loss 1.234  lr 1.9e-04  grad 0.87  aux 0.0123  1,234 tok/s  ETA 3m12s
    finetune -q sft recipes/tiny-moe/sft.yaml   # --quiet: no step lines (the INFO level), the summary stays

Replaces transformers' PrinterCallback/ProgressCallback, which print the raw metrics dict (with
the routing summaries, dozens of keys) on every rank. The metrics themselves are untouched:
log_history (metrics.json) and the loggers get everything, this only chooses what a person reads.
Layer: train.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

log = logging.getLogger("finetune")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def train_line(step: int, total: int, logs: dict, tokens_per_s: float | None, eta: float | None) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("learning_rate", "lr", ".2e"), ("grad_norm", "grad", ".3g"),
                            ("aux_loss", "aux", ".4g"), ("rewards/accuracies", "acc", ".3f")):
        if isinstance(logs.get(key), (int, float)):
            parts.append(f"{label} {logs[key]:{fmt}}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    if eta is not None:
        parts.append(f"ETA {_duration(eta)}")
    return "  ".join(parts)


def eval_line(step: int, total: int, logs: dict) -> str:
    keys = [k for k in logs if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second",
                                                                     "eval_steps_per_second")]
    shown = [f"{k[5:]} {logs[k]:.4g}" for k in keys if isinstance(logs[k], (int, float))]
    return f"eval at step {step}/{total}: " + ("  ".join(shown) or "no metrics")


class ConsoleCallback(TrainerCallback):
    """One line per logging step on the main process, at INFO (so `--quiet` hides it)."""

    def __init__(self):
        self._last = None  # (time, step, tokens) at the previous training log

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.global_step, None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(k.startswith("eval_") for k in logs):
            log.info(eval_line(state.global_step, state.max_steps, logs))
            return
        if "loss" not in logs:  # the end-of-training summary (train_runtime, ...): the summary prints it
            return
        now, step, tokens = time.perf_counter(), state.global_step, logs.get("num_tokens")
        then, step0, tokens0 = self._last or (now, step, None)
        rate = eta = None
        if now > then and step > step0:
            per_step = (now - then) / (step - step0)
            eta = per_step * (state.max_steps - step)
            if isinstance(tokens, (int, float)) and isinstance(tokens0, (int, float)):
                rate = (tokens - tokens0) / (now - then)
        self._last = (now, step, tokens)
        log.info(train_line(step, state.max_steps, logs, rate, eta))


def install(trainer) -> ConsoleCallback:
    """Swap the trainer's printer for ConsoleCallback (in its place, so later callbacks keep their order)."""
    callbacks = trainer.callback_handler.callbacks
    printers = [i for i, c in enumerate(callbacks) if isinstance(c, (PrinterCallback, ProgressCallback))]
    console = ConsoleCallback()
    for i in reversed(printers):
        del callbacks[i]
    callbacks.insert(printers[0] if printers else len(callbacks), console)
    return console
