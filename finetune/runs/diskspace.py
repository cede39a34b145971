"""Disk space: refuse a checkpoint or an export that cannot fit, and name a full disk plainly.

    finetune sft RECIPE                        # before every checkpoint save (runs/signals.py's callback)
    finetune export RUN --output DIR           # before the first shard is written

Before writing, the bytes about to be written are compared with `shutil.disk_usage` of the file
system that will hold them: a UserError names the path, the bytes needed and the bytes free.
Another process can still fill the disk meanwhile: `is_full` recognises the resulting errors
(OSError ENOSPC/EDQUOT; torch's zip writer reports it as a RuntimeError "unexpected pos" or "file
write failed") so the caller reports the same message instead of a traceback.
Layer: runs.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from finetune.errors import UserError

# Room left beside the estimate: file system metadata, the small files written with the tensors
# (trainer_state.json, scheduler, RNG states, tokenizer, configs), rounding of block sizes.
MARGIN = 1.05
MARGIN_BYTES = 16 << 20


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> tuple[Path, int]:
    """(nearest existing ancestor, its file system's free bytes for an ordinary user)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate, shutil.disk_usage(candidate).free
    raise AssertionError("the root directory exists")


def full_error(path: Path, what: str, needed: int | None, free: int, fix: str) -> UserError:
    need = f"needs about {human(needed)}" if needed else "did not fit"
    return UserError(f"{what} at {path}: {need}, {human(free)} free on that file system; {fix}")


def shortfall(path: Path, needed: int, what: str, fix: str) -> UserError | None:
    """A UserError when `needed` bytes (plus a margin) do not fit at path, else None."""
    _, free = free_bytes(path)
    want = int(needed * MARGIN) + MARGIN_BYTES
    return full_error(path, what, want, free, fix) if want > free else None


def require(path: Path, needed: int, what: str, fix: str) -> None:
    problem = shortfall(path, needed, what, fix)
    if problem is not None:
        raise problem


def is_full(exc: BaseException) -> bool:
    """Did this exception come from a disk that filled up (or a quota that ran out)?"""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        # torch.save's zip writer turns a short write into these RuntimeErrors (torch 2.x)
        if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
            return True
        if "No space left on device" in text or "Disk quota exceeded" in text:  # e.g. safetensors' Rust IoError
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def checkpoint_bytes(model, optimizer=None) -> int:
    """What one Trainer checkpoint writes: the trainable tensors, and the optimizer's state.

    The optimizer's state is measured when it exists (after the first step); before that it is
    taken as Adam's two float32 moments per trainable value. Sharded parameters count whole
    (DTensor.numel() is the global size; ZeRO-3 keeps it in ds_numel): every rank's share lands
    in the same checkpoint folder.
    """
    trainable, count = 0, 0
    for p in model.parameters():
        if p.requires_grad:
            n = int(getattr(p, "ds_numel", p.numel()))
            trainable += n * p.element_size()
            count += n
    states = 0
    try:
        for state in (getattr(optimizer, "state", None) or {}).values():
            for value in state.values():
                if hasattr(value, "numel") and value.numel() > 1:
                    states += int(value.numel()) * value.element_size()
    except (AttributeError, TypeError, RuntimeError):  # wrapped optimizers (DeepSpeed) keep their state elsewhere
        states = 0
    return trainable + (states or 2 * 4 * count)
