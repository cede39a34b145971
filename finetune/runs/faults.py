"""Test-only fault injection: send a signal to this process at a named point (no timing involved).

    FINETUNE_FAULT_AT=mid_step FINETUNE_FAULT_STEP=3 finetune sft RECIPE     # tests/e2e/test_faults.py

FINETUNE_FAULT_AT names the point: data (after data preparation, before anything is written),
mid_step (between backward and the optimizer step of step FINETUNE_FAULT_STEP), save (inside the
checkpoint save of that step, before its totals file), swap (just before a finished run is
renamed into place), export (after the merged shards are written, before verification).
FINETUNE_FAULT_SIGNAL: TERM (default), INT, USR1, or STOP (freezes the process: the tests use it
to hold a run while a second one starts). FINETUNE_FAULT_RANK: only this rank (default every rank).
FINETUNE_FAULT_REPEAT=2 sends it twice (the second signal exits at once).
Unset, `point` is one dictionary lookup.
Layer: runs.
"""

from __future__ import annotations

import os
import signal


def point(name: str, step: int | None = None) -> None:
    if os.environ.get("FINETUNE_FAULT_AT") != name:
        return
    if step is not None and step != int(os.environ.get("FINETUNE_FAULT_STEP", "3")):
        return
    rank = os.environ.get("FINETUNE_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    signum = getattr(signal, "SIG" + os.environ.get("FINETUNE_FAULT_SIGNAL", "TERM"))
    for _ in range(int(os.environ.get("FINETUNE_FAULT_REPEAT", "1"))):
        os.kill(os.getpid(), signum)
