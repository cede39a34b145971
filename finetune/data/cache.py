"""The prepared-data cache: entries keyed by everything that changes the result, written beside and
renamed into place, checked against their manifest before use.

    finetune sft recipes/tiny-moe/sft.yaml          # prepares once; later runs and --resume load the entry
    FINETUNE_CACHE=/scratch/ftcache finetune sft R   # somewhere else (a shared file system for several nodes)

Where: `$FINETUNE_CACHE`, else `$XDG_CACHE_HOME/finetune/data` (`~/.cache/finetune/data`), beside
datasets' and the hub's own caches. Not the run's staging directory: that is removed when a run
finishes or fails, and a second run of the same data (another output_dir, the DPO stage of a sweep,
a different seed without eval_split) should find it too. Nothing is evicted; delete the directory
to reclaim the space (finetune/data/prep.py logs its path and size).

An entry is `<root>/<key>/` with `train/` and `eval/` (datasets.save_to_disk folders) and
`manifest.json`: the key's inputs, the row report and every file's size, xxh3-128 and stat (size,
mtime, inode), written last. A load rehashes only the files whose stat changed: a truncated or
rewritten file is caught; bytes flipped in place without a new mtime (a failing disk) are not.
It is built in `<root>/.tmp-<key>-<host>-<pid>` and renamed into place in one step, so a kill during
preparation leaves only a temporary folder (removed by the next preparation on that host). An
entry whose manifest is missing or whose files differ from it (truncated, edited) is said so,
removed and prepared again, never used. TRL's own dataset.map caches land beside the files
(cache-*.arrow, named by the entry's fingerprints): they are not in the manifest and not checked.

Under a launcher the ranks that wait for the main process's preparation wait at a barrier, whose
timeout is the trainer's `ddp_timeout` (30 minutes by default): prepare a larger data set once
beforehand (one process, same recipe), or raise `sft.ddp_timeout`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from finetune.data.hashing import hash_file, stat_key
from finetune.errors import UserError

log = logging.getLogger("finetune")

MANIFEST = "manifest.json"
HASHES = ".source-hashes"
"""Under the root: each local source file's hash remembered under its stat (hashing.hash_file_memo)."""
# Bumped when an entry's layout changes; the code that shapes rows is keyed by its own hash.
LAYOUT = 1


def root() -> Path:
    env = os.environ.get("FINETUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "data"


def key(parts: dict) -> str:
    """The entry's name: sha256 of its inputs as canonical JSON."""
    text = json.dumps({"layout": LAYOUT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _files(folder: Path) -> dict[str, dict]:
    """Each file's size, hash and stat. The files were written moments ago, so a later write could
    fall in the same clock tick and keep the mtime (git's "racy" case): each file's mtime is set
    back to a fixed past time before its stat is recorded, so any later write shows a new mtime."""
    stamp = (time.time_ns() // 1_000_000_000 - 10) * 1_000_000_000
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            digest = hash_file(p)
            os.utime(p, ns=(stamp, stamp))
            out[str(p.relative_to(folder))] = {"size": p.stat().st_size, "xxh3_128": digest, "stat": stat_key(p)}
    return out


def damage(entry: Path, key_: str) -> str | None:
    """Why the entry cannot be used, or None when every file matches its manifest."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (an interrupted copy?)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("key") != key_:
        return f"its manifest names key {manifest.get('key')!r}"
    for name, want in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}"
        if want.get("stat") == stat_key(path):
            continue  # untouched since it was written and hashed: rehashing gigabytes on every load is most of a hit
        if hash_file(path) != want["xxh3_128"]:
            return f"{name} differs from the file that was written (xxh3-128)"
    return None


def lookup(key_: str) -> tuple[Path, dict] | None:
    """(entry folder, manifest) when a sound entry exists; a damaged one is reported and removed."""
    entry = root() / key_
    if not entry.exists():
        return None
    reason = damage(entry, key_)
    if reason is None:
        return entry, json.loads((entry / MANIFEST).read_text())
    # each rank checks the entry it reads: per rank (distributed.PER_RANK; not imported, it loads torch)
    log.warning("data cache entry %s is damaged: %s; preparing the data again", entry, reason, extra={"per_rank": True})
    discard(entry)
    return None


def discard(folder: Path) -> None:
    """Rename aside first, so a half-removed folder is never taken for an entry."""
    trash = folder.with_name(f".trash-{folder.name}-{socket.gethostname()}-{os.getpid()}")
    try:
        folder.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(base: Path) -> None:
    """Remove the temporary folders of preparations on this host whose process is gone (killed)."""
    host = socket.gethostname()
    for tmp in base.glob(f".*-*-{host}-*"):
        if tmp.name.split("-", 1)[0] in (".tmp", ".trash"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                log.info("removing %s, left by an interrupted data preparation", tmp)
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def building(key_: str):
    """A fresh temporary folder for the entry; removed if the body raises. A cache folder that
    cannot be written (no permission, read-only, full) is a user error naming it."""
    base = root()
    tmp = base / f".tmp-{key_}-{socket.gethostname()}-{os.getpid()}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        _sweep(base)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot write the prepared data to {base} ({exc.strerror}); free space there, or set "
                            "FINETUNE_CACHE to a writable folder with room for the tokenized data") from None
        raise


def publish(tmp: Path, key_: str, parts: dict, report: dict) -> Path:
    """Write the manifest last, then rename the folder into place. Another job that published the
    same key first wins (its entry is equal by construction); this one's folder is removed."""
    manifest = {"key": key_, "parts": parts, "report": report, "files": _files(tmp)}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    entry = root() / key_
    try:
        tmp.rename(entry)
    except OSError:
        if not entry.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


@contextmanager
def main_first(state):
    """TRL's global_then_local_main_first (the global main goes first, then each node's local main,
    then everyone else), with the barriers kept when the body raises: otherwise the other ranks
    would wait at a barrier until the launcher's timeout instead of reporting."""
    if state is None or state.num_processes == 1:
        yield
        return
    if not state.is_main_process:
        state.wait_for_everyone()
    if not state.is_local_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_local_main_process:
            state.wait_for_everyone()
        if state.is_main_process:
            state.wait_for_everyone()
