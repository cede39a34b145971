"""Data files: read the rows of a local .jsonl/.json/.parquet file or a hub data set, numbered.

Unreadable files are user errors naming the file (and the line and byte offset of a bad UTF-8
byte); finetune/data.py checks and shapes the rows. `count_rows` counts a local file's rows
cheaply for `finetune validate`.

    finetune validate recipes/tiny-moe/sft.yaml     # counts rows when data.eval_split is set
    finetune sft recipes/tiny-moe/sft.yaml          # reads every row
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune import hub
from finetune.errors import UserError

LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet"}


@dataclass
class Row:
    source: str
    number: int
    """1-based row (line, for JSONL) number within its source."""
    value: dict


def _read_text(path: Path, source: str) -> str:
    """The file as UTF-8 text; a bad byte is reported with its line and byte offset."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{source}: cannot read the data file ({exc.strerror or exc})") from None
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # Windows tools write one; JSON forbids it
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + bom
        line = data.count(b"\n", 0, offset) + 1
        raise UserError(
            f"{source}:{line}: not valid UTF-8 at byte offset {offset} ({exc.reason}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes"
        ) from None


def _open_parquet(path: Path, source: str):
    """Read the footer first: datasets would otherwise start a cache for a file that is not Parquet."""
    import pyarrow.parquet as pq  # only for .parquet sources: validate stays fast

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise UserError(f"{source}: not a readable Parquet file ({exc}); check the file, or give .jsonl/.json") from None


def count_rows(source: str) -> int | None:
    """Rows in a local data file, counted cheaply (Parquet: from its footer); None when unknown
    (a hub data set, or a file that cannot be read: reading it for training reports why)."""
    path = Path(source)
    if path.suffix not in LOCAL_SUFFIXES or not path.is_file():
        return None
    try:
        if path.suffix == ".jsonl":
            with path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        if path.suffix == ".json":
            data = json.loads(path.read_bytes())
            return len(data) if isinstance(data, list) else None
        return _open_parquet(path, source).metadata.num_rows
    except (OSError, ValueError, UserError):
        return None


def read_rows(source: str) -> list[Row]:
    """All rows of a local .jsonl/.json/.parquet file, or of a hub data set `name[:split]`."""
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise UserError(f"data file not found: {source} (relative paths are read from {Path.cwd()})")
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(_read_text(path, source).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(Row(source, i, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{source}:{i}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            return rows
        if path.suffix == ".json":
            try:
                data = json.loads(_read_text(path, source))
            except json.JSONDecodeError as exc:
                raise UserError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
            if not isinstance(data, list):
                raise UserError(f"{source}: expected a JSON list of rows, got {type(data).__name__}")
            return [Row(source, i, r) for i, r in enumerate(data, start=1)]
        parquet = _open_parquet(path, source)
        try:
            table = parquet.read().to_pylist()
        except (OSError, ValueError) as exc:
            raise UserError(f"{source}: the Parquet file is damaged ({exc}); re-write it") from None
        return [Row(source, i, r) for i, r in enumerate(table, start=1)]
    return _read_hub(source)


def _read_hub(source: str) -> list[Row]:
    from datasets import (
        load_dataset,  # datasets costs ~1 s to import: only for hub sources
    )

    name, _, split = source.partition(":")
    hub.check_reachable(name, "dataset", f"data: {source}")  # seconds, not ~30 s of retries
    try:
        table = load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise UserError(
            f"cannot load `{source}`: it is not a local .jsonl/.json/.parquet file, and the hub data set could not be "
            f"loaded ({exc.__class__.__name__}: {exc}). Check the path, or download the data set and name the file."
        ) from None
    return [Row(source, i, r) for i, r in enumerate(table, start=1)]
