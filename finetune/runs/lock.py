"""One writer per output: a lock file beside the output, held while a run or an export writes it.

    finetune sft RECIPE [--resume|--overwrite]    # locks <parent>/.<name>.lock from claim to finish
    finetune export RUN --output DIR [--overwrite] # locks <parent>/.<DIR name>.lock while it writes

The lock is created with O_CREAT|O_EXCL (atomic on local file systems and on NFSv3+), and holds
the owner's host, pid, start time and command. It sits beside the staging directory rather than
inside it: a run removes and recreates its staging directory, and an export's temporary
directory has a random name, so a lock inside either could not stop a second writer. A second
writer is refused with the owner named. On the same host a lock whose process is gone is stale
(a kill -9, a node reboot): it is reported, and `--resume` or `--overwrite` take it over. A lock
from another host is never judged stale (its pid means nothing here); the message says how to
remove it. Only the main process of a distributed run takes the lock.
Layer: runs.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from finetune.errors import UserError

log = logging.getLogger("finetune")


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: reported as an unknown owner


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {started}"
            f" (`{owner.get('command', '?')}`)")


def _create(path: Path, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
    return True


def _refuse_unless_stale(path: Path, output: Path, what: str, takeover: bool, flags: str) -> dict:
    """The owner of an existing lock when it may be taken over (stale, and takeover given); else a UserError."""
    held = _read(path)
    if not held:
        raise UserError(f"{what} {output}: the lock {path} is unreadable (a writer is starting, or it is damaged); "
                        f"if no finetune job writes {output}, delete {path}")
    if held.get("host") != socket.gethostname():
        raise UserError(f"{what} {output} is being written by {_describe(held)}; a lock from another host is "
                        f"never taken over: wait for that job, or, if it is gone, delete {path}")
    if _alive(int(held.get("pid", -1))):
        raise UserError(f"{what} {output} is being written by {_describe(held)}; one writer per output: wait "
                        f"for it to finish, stop it, or choose another {what}")
    if not takeover:
        raise UserError(f"{what} {output}: stale lock {path} from {_describe(held)}, a process that is gone "
                        f"(killed?); pass {flags} to take it over, or delete {path}")
    return held


def check(output: Path, what: str, takeover: bool, flags: str) -> None:
    """The refusal `acquire` would give, without creating anything (stages call it before loading the model)."""
    path = lock_path(Path(output))
    if path.exists():
        _refuse_unless_stale(path, output, what, takeover, flags)


def acquire(output: Path, what: str, takeover: bool, flags: str) -> Path:
    """Take the lock of `output` or raise a UserError naming its owner. takeover: --resume/--overwrite
    given (a stale lock of this host is then replaced). flags: those flags, for the message."""
    path = lock_path(Path(output))
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
             "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a takeover raced by another one: look again
        if _create(path, owner):
            return path
        held = _refuse_unless_stale(path, output, what, takeover, flags)
        log.warning("taking over the stale lock %s from %s, a process that is gone", path, _describe(held))
        stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            path.rename(stale)  # atomic: of two takeovers one renames, the other finds it gone
            stale.unlink()
        except FileNotFoundError:
            pass
    raise UserError(f"{what} {output}: could not take the lock {path}; another writer raced for it, try again")


def release(path: Path | None) -> None:
    """Remove the lock if it is still ours (never another writer's)."""
    if path is None:
        return
    held = _read(path)
    if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
