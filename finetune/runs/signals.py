"""Preemption: SIGTERM, SIGINT and SIGUSR1 end a command cleanly; during training, at a checkpoint.

    finetune sft RECIPE          # SLURM `--signal=USR1@120`, Kubernetes or a spot instance sends SIGTERM
    finetune sft RECIPE --resume # continues from the checkpoint the signal left (docs/clusters.md)

cli.main installs the handlers for the whole command (`handled`). Outside training a signal raises
`Interrupted` where the process is, like Ctrl-C raises KeyboardInterrupt, so every `finally` and
`claimed` cleanup runs and the disk is left as found (an export's temporary directory is removed;
a run's staging directory keeps only complete checkpoints). `deferred()` holds a signal back over
a few lines that must not be cut in half (the rename that puts a run or an export into place).
During training (finetune/train/preempt.py's callback calls `training(True)`) a signal only sets a flag; at the next optimizer-step
boundary every rank agrees on the flag (one all-reduce, so no rank is left waiting in a
collective), the Trainer saves a checkpoint on every rank through its usual path (DDP, FSDP2 and
ZeRO-3 alike) and stops, and train_and_save raises `Interrupted` with the checkpoint's name.
A second signal exits at once. Exit status: 130 for SIGINT, 143 for SIGTERM and SIGUSR1 (SLURM's
warning signal asks for the same thing as a SIGTERM).
Layer: runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """A signal ended the command. A BaseException, like KeyboardInterrupt: `except Exception` cleanups
    that would swallow it are skipped; `finally` blocks run."""

    def __init__(self, signum: int, checkpoint: str | None = None, finished: str | None = None):
        self.signum, self.checkpoint, self.finished = signum, checkpoint, finished
        super().__init__(f"{signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    # 128 + signal number is the shell's convention; SIGUSR1 counts as SIGTERM (143) for schedulers.
    return 130 if signum == signal.SIGINT else 128 + signal.SIGTERM


class _State:
    pending: int | None = None  # the first signal received and not yet acted on
    mode = "raise"  # "raise": raise Interrupted now; "defer": keep it for later (a flag)
    installed = False


_state = _State()


def _handler(signum, frame) -> None:
    if _state.pending is not None:  # the second signal: the user (or the scheduler) insists
        print(f"\n{signal.Signals(signum).name} again: exiting at once", file=sys.stderr, flush=True)
        os._exit(exit_code(signum))
    _state.pending = signum
    if _state.mode == "raise":
        raise Interrupted(signum)
    print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting "
          f"(send it again to exit at once)", file=sys.stderr, flush=True)


@contextmanager
def handled():
    """Install the handlers for one command (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.pending, _state.mode, _state.installed = None, "raise", True
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state.pending, _state.mode, _state.installed = None, "raise", False


def take_pending() -> int | None:
    signum, _state.pending = _state.pending, None
    return signum


@contextmanager
def deferred(finished: str | None = None):
    """Hold signals over a block that must not stop halfway; raise the held one after it.

    finished: what is complete once the block ran (said in the message), e.g. the run's path."""
    mode, _state.mode = _state.mode, "defer"
    try:
        yield
    finally:
        _state.mode = mode
    if _state.pending is not None and mode == "raise":
        raise Interrupted(take_pending(), finished=finished)


def training(on: bool) -> None:
    """While training, a signal only sets the flag PreemptionCallback acts on at the next step boundary."""
    if _state.installed:
        _state.mode = "defer" if on else "raise"


def pending() -> int | None:
    return _state.pending
