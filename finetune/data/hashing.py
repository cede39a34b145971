"""What identifies a source's content for the data cache key (finetune/data/key.py): file hashes,
remembered under each file's stat so that a second run does not read the data again, and hub data
sets' datasets fingerprints.

    finetune sft recipes/tiny-moe/sft.yaml     # hashes the data files once; later runs read the memo
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from finetune.data.files import LOCAL_SUFFIXES, load_hub
from finetune.errors import UserError


def fingerprint(source: str, config: str | None = None, data_files=None, split: str | None = None,
                memo: Path | None = None) -> dict:
    """What identifies a source's content for the data cache (finetune/data/cache.py): a local
    file's xxh3-128 (about 9 GB/s here, so a cache hit stays fast; the cache key is no security
    boundary), or a hub data set's datasets fingerprint. A source that cannot be read gets a key
    too: preparing it then raises the error that names it. `memo`: a folder remembering each
    file's hash under its stat (hash_file_memo)."""
    path = Path(source)
    if path.is_dir():  # every file of the folder, by relative path
        return {"source": source, "files": {str(p.relative_to(path)): hash_file_memo(p, memo) if memo else hash_file(p)
                                            for p in sorted(path.rglob("*")) if p.is_file()}}
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            return {"source": source, "missing": True}
        return {"source": source, "xxh3_128": hash_file_memo(path, memo) if memo else hash_file(path)}
    try:
        return {"source": source, "datasets_fingerprint": load_hub(source, config, data_files, split)._fingerprint}
    except UserError as exc:
        return {"source": source, "unavailable": str(exc)}


def stat_key(path: Path) -> list[int]:
    """Size, modification time (ns) and inode: what changes when a file is rewritten, truncated or
    replaced. git's index trusts the same fields to skip rehashing an unchanged file."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def hash_file_memo(path: Path, memo: Path) -> str:
    """hash_file, remembered under the file's stat_key in `memo` (one small JSON per file path), so
    a second run of a job does not read its whole data file again before it can use the cache
    (measured: hashing was most of a cache hit's time). A memo that cannot be read or written is
    ignored: the hash is computed."""
    path = path.resolve()
    record = memo / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    stat = stat_key(path)
    try:
        known = json.loads(record.read_text())
        if known["path"] == str(path) and known["stat"] == stat:
            return known["xxh3_128"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hash_file(path)
    if time.time_ns() - stat[1] < 2_000_000_000:
        # written in the last seconds: a write in the same clock tick would keep this stat (git's
        # "racy" case), so such a file is hashed again next time rather than trusted
        return digest
    try:
        memo.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path), "stat": stat, "xxh3_128": digest}))
        os.replace(tmp, record)  # readers see the old record or the new one, never half of one
    except OSError:
        pass
    return digest


def hash_file(path: Path) -> str:
    import xxhash  # a dependency of datasets

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
