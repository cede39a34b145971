"""Units of the fault handling: full-disk recognition and estimates, the lock, the signal states.

    python -m pytest tests/unit/runs/test_faults_units.py
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from finetune.errors import UserError
from finetune.runs import diskspace, lock, signals


def test_full_disk_errors_are_recognised_and_others_not():
    assert diskspace.is_full(OSError(errno.ENOSPC, "No space left on device"))
    assert diskspace.is_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # torch.save's zip writer on a full disk (the issue's traceback), and safetensors' Rust IoError
    assert diskspace.is_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1814336 vs 1814228"))
    assert diskspace.is_full(Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                       "message: \"No space left on device\" })"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert diskspace.is_full(outer)  # found through the cause
    assert not diskspace.is_full(OSError(errno.EACCES, "Permission denied"))
    assert not diskspace.is_full(RuntimeError("CUDA out of memory"))


def test_checkpoint_estimate_counts_trainable_tensors_and_adam_moments():
    model = torch.nn.Linear(10, 4)  # 44 float32 values
    model.bias.requires_grad_(False)  # 40 trainable
    assert diskspace.checkpoint_bytes(model) == 40 * 4 + 2 * 40 * 4  # before the first step: Adam's two moments
    optimizer = torch.optim.SGD([model.weight], lr=0.1, momentum=0.9)
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    assert diskspace.checkpoint_bytes(model, optimizer) == 40 * 4 + 40 * 4  # measured: one momentum buffer


def test_shortfall_names_path_needed_and_free(tmp_path, monkeypatch):
    real = diskspace.shutil.disk_usage
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=2_000_000))
    problem = diskspace.shortfall(tmp_path / "not-yet" / "there", 50_000_000, "the export", "free space")
    assert isinstance(problem, UserError)
    text = str(problem)
    assert str(tmp_path / "not-yet" / "there") in text and f"needs about {diskspace.human(int(50_000_000 * diskspace.MARGIN) + diskspace.MARGIN_BYTES)}," in text and "2.0 MB free" in text
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000_000))
    assert diskspace.shortfall(tmp_path, 50_000_000, "the export", "free space") is None


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_lock_refuses_live_owner_takes_over_stale_and_never_foreign(tmp_path):
    out = tmp_path / "run"
    held = lock.acquire(out, "output_dir", False, "--resume")
    owner = json.loads(held.read_text())
    assert held == tmp_path / ".run.lock" and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(UserError, match=f"pid {os.getpid()} on host"):  # this process is alive
        lock.acquire(out, "output_dir", True, "--resume")
    lock.release(held)
    assert not held.exists()

    held.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": 0, "command": "x"}))
    with pytest.raises(UserError, match="stale lock"):
        lock.check(out, "output_dir", False, "--resume")
    lock.check(out, "output_dir", True, "--resume")  # would be taken over
    assert json.loads(lock.acquire(out, "output_dir", True, "--resume").read_text())["pid"] == os.getpid()

    held.write_text(json.dumps({"host": "elsewhere", "pid": dead_pid(), "started": 0, "command": "x"}))
    with pytest.raises(UserError, match="another host is never taken over"):
        lock.acquire(out, "output_dir", True, "--resume")
    lock.release(held)  # not ours: left alone
    assert json.loads(held.read_text())["host"] == "elsewhere"


def test_signal_raises_outside_training_and_waits_in_deferred_blocks():
    with signals.handled():
        with pytest.raises(signals.Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert caught.value.exit_code == 143 and signals.take_pending() == signal.SIGUSR1
        done = []
        with pytest.raises(signals.Interrupted) as caught:
            with signals.deferred(finished="/runs/x"):
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the whole block ran")
        assert done and caught.value.exit_code == 130 and caught.value.finished == "/runs/x"
    assert signal.getsignal(signal.SIGTERM) is not signals._handler  # handlers restored
