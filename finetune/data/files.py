"""Data files: read the rows of a local .jsonl/.json/.parquet/.csv file, a local folder
(datasets.save_to_disk, or data files datasets can load) or a hub data set, numbered.

Unreadable files are user errors naming the file (and the line and byte offset of a bad UTF-8
byte); finetune/data/rows.py checks and shapes the rows. `iter_source` streams a source's rows as
JSON text for the datasets-based preparation (finetune/data/prep.py) (finetune/data/hashing.py
identifies its content for the data cache), `read_rows` reads a small file whole (evaluation, routing), and
`count_rows` counts a local file's rows cheaply for `finetune validate`. finetune/data/sources.py
reads a recipe's source entries (mappings with config, split, data_files) through these functions.

    finetune validate recipes/tiny-moe/sft.yaml     # counts rows when data.eval_split is set
    finetune sft recipes/tiny-moe/sft.yaml          # reads every row
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune import hub
from finetune.errors import UserError

LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"}
DISK_MARKERS = ("dataset_dict.json", "state.json")
"""What datasets.save_to_disk writes at a folder's top (a DatasetDict, or one Dataset)."""


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


def count_rows(source: str, split: str | None = None) -> int | None:
    """Rows in a local data file, counted cheaply (Parquet: from its footer); None when unknown
    (a hub data set, or a file that cannot be read: reading it for training reports why)."""
    path = Path(source)
    if path.is_dir() and any((path / m).is_file() for m in DISK_MARKERS):
        try:  # memory-mapped: the row count is in the Arrow files' metadata
            return len(load_folder(source, split=split))
        except UserError:
            return None
    if path.suffix not in LOCAL_SUFFIXES or not path.is_file():
        return None
    try:
        if path.suffix == ".csv":
            return sum(1 for _ in _iter_csv(path, source, None))
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
    """All rows of a local .jsonl/.json/.parquet file, or of a hub data set `name[:split]`, in memory
    (evaluation and routing read small files this way; training streams them, finetune/data/prep.py)."""
    rows = []
    texts = list(iter_source(source))  # a bad UTF-8 byte anywhere is reported before a JSON error
    for number, text in texts:
        try:
            rows.append(Row(source, number, json.loads(text)))
        except json.JSONDecodeError as exc:
            raise UserError(json_error(source, number, exc)) from None
    return rows


def json_error(source: str, number: int, exc: json.JSONDecodeError) -> str:
    return f"{source}:{number}: not valid JSON ({exc.msg}, column {exc.colno})"


def iter_source(source: str, progress=None, config: str | None = None, data_files=None,
                split: str | None = None) -> Iterator[tuple[int, str]]:
    """(row number, the row as JSON text) for every row of a source, streamed: JSONL line by line
    (not parsed here: the parallel conversion parses it), Parquet by record batch, a hub data set
    from datasets' own Arrow cache; rows that are not JSON lines are written as JSON (ASCII, so a
    lone surrogate escape stays an escape). A .json file is one JSON array, which the json module can
    only parse whole. `progress(n)` is called with bytes (local files) or rows (hub) done.

    JSONL lines are split at `\\n` only (str.splitlines also splits inside a string at U+2028 and
    other separators that JSON allows raw). UTF-8 errors raise with line and byte offset.
    config, data_files and split go to datasets for a folder or a hub data set (split also picks
    one of a save_to_disk DatasetDict's splits)."""
    path = Path(source)
    if path.is_dir():
        yield from iter_table(load_folder(source, config, data_files, split), progress)
        return
    if path.suffix not in LOCAL_SUFFIXES:
        yield from iter_table(load_hub(source, config, data_files, split), progress)
        return
    if not path.is_file():
        raise UserError(f"data file not found: {source} (relative paths are read from {Path.cwd()})")
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, source, progress)
    elif path.suffix == ".csv":
        yield from _iter_csv(path, source, progress)
    elif path.suffix == ".json":
        try:
            data = json.loads(_read_text(path, source))
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list):
            raise UserError(f"{source}: expected a JSON list of rows, got {type(data).__name__}")
        for i, r in enumerate(data, start=1):
            yield i, json.dumps(r)
    else:
        yield from _iter_parquet(path, source, progress)


def _iter_jsonl(path: Path, source: str, progress) -> Iterator[tuple[int, str]]:
    try:
        f = path.open("rb")
    except OSError as exc:
        raise UserError(f"{source}: cannot read the data file ({exc.strerror or exc})") from None
    with f:
        offset = 0
        for number, line in enumerate(f, start=1):
            bom = 3 if number == 1 and line.startswith(b"\xef\xbb\xbf") else 0  # Windows tools write one; JSON forbids it
            try:
                text = line[bom:].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{source}:{number}: not valid UTF-8 at byte offset {offset + bom + exc.start} ({exc.reason}); "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes"
                ) from None
            offset += len(line)
            if progress is not None:
                progress(len(line))
            if text.strip():
                yield number, text


def _iter_parquet(path: Path, source: str, progress) -> Iterator[tuple[int, str]]:
    parquet = _open_parquet(path, source)
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1000):
            for value in batch.to_pylist():
                number += 1
                # default=str: columns a row does not train on (timestamps, bytes) need not be JSON
                yield number, json.dumps(value, default=str)
            if progress is not None:
                progress(batch.nbytes)
    except (OSError, ValueError) as exc:
        raise UserError(f"{source}: the Parquet file is damaged ({exc}); re-write it") from None


def load_hub(source: str, config: str | None = None, data_files=None, split: str | None = None):
    """The hub data set `name[:split]` (datasets keeps it in its own Arrow cache); `split` given
    here wins over the one in the name."""
    import datasets  # datasets costs ~1 s to import: only for hub sources

    name, _, named_split = source.partition(":")
    hub.check_reachable(name, "dataset", f"data: {source}")  # seconds, not ~30 s of retries
    try:
        return datasets.load_dataset(name, config, data_files=data_files or None, split=split or named_split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not found / offline"
        raise UserError(
            f"cannot load `{source}`: it is not a local .jsonl/.json/.parquet/.csv file or folder, and the hub data set could not be "
            f"loaded ({exc.__class__.__name__}: {exc}). Check the path, or download the data set and name the file."
        ) from None


def load_folder(source: str, config: str | None = None, data_files=None, split: str | None = None):
    """A local folder: what datasets.save_to_disk wrote (load_from_disk; a DatasetDict's `split`),
    or data files datasets can load (load_dataset on the folder: a downloaded hub data set)."""
    import datasets  # datasets costs ~1 s to import: only for folder sources

    path = Path(source)
    if not any((path / m).is_file() for m in DISK_MARKERS):
        try:
            return datasets.load_dataset(str(path), config, data_files=data_files or None, split=split or "train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for "no data files / no such split"
            raise UserError(f"{source}: a folder that is neither a datasets.save_to_disk folder nor data files "
                            f"datasets can load ({exc.__class__.__name__}: {exc})") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged or partial save_to_disk folder, whatever datasets raises
        raise UserError(f"{source}: cannot read the datasets.save_to_disk folder ({exc}); save it again") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise UserError(f"{source}: no split `{name}` in the saved data set (splits: {', '.join(loaded)}); "
                            "set `split` on the source")
        return loaded[name]
    return loaded


def _iter_csv(path: Path, source: str, progress) -> Iterator[tuple[int, str]]:
    """CSV with a header row, every value a string (the csv module: quoted fields may hold newlines;
    pyarrow's reader would guess types, and turn an answer `42` into a number)."""
    try:
        with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
            for number, record in enumerate(csv.DictReader(f), start=1):
                if None in record:  # more fields than the header names
                    raise UserError(f"{source}:{number}: {len(record) - 1 + len(record[None])} fields, "
                                    f"the header names {len(record) - 1}; quote fields that hold commas")
                yield number, json.dumps(record)
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not valid UTF-8 ({exc.reason}); re-encode the file as UTF-8") from None
    except csv.Error as exc:
        raise UserError(f"{source}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read the data file ({exc.strerror or exc})") from None
    if progress is not None:
        progress(path.stat().st_size)


def iter_table(table, progress) -> Iterator[tuple[int, str]]:
    """The rows of a datasets.Dataset (a hub data set, a folder) as JSON text, numbered from 1."""
    number = 0
    for batch in table.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*batch.values()):
            number += 1
            yield number, json.dumps(dict(zip(columns, values)), default=str)
        if progress is not None:
            progress(len(batch[columns[0]]) if columns else 0)
