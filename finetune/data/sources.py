"""Data sources: a data.train / data.eval entry (a string, or a DataSource mapping) -> its rows, its
format, its share of the mixture. Reading itself is finetune/data/files.py's; formats are
finetune/data/formats.py's; the mixture's draw is finetune/data/mixture.py's.

    finetune validate R.yaml   # first_rows() of every local source: format and mapping checked
    finetune sft R.yaml        # finetune/data/prep.py reads every row through iter_rows()

A string entry is `{path: STRING}`: a local file or folder, else a hub data set `name[:split]`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path

from finetune.data import files, formats, hashing
from finetune.data.rows import RowError
from finetune.errors import Problem, UserError
from finetune.recipe import DataSource

log = logging.getLogger("finetune")

FIRST_ROWS = 20
"""How many rows finetune validate reads of each local source (the first parseable one decides)."""


def spec(entry) -> DataSource:
    """The entry as a DataSource (a string is its `path`)."""
    return entry if isinstance(entry, DataSource) else DataSource(path=str(entry))


def _where(s: DataSource) -> str:
    """What files.py's readers take: a path, or a hub id (its split is passed on its own)."""
    return s.path or s.name


def local_path(entry) -> Path | None:
    """The local file or folder an entry reads, or None for a hub data set."""
    s = spec(entry)
    if s.name or not s.path:
        return None
    path = Path(s.path)
    return path if path.suffix in files.LOCAL_SUFFIXES or path.exists() else None


def _read_kwargs(s: DataSource) -> dict:
    return {"config": s.config, "data_files": list(s.data_files) or None, "split": s.split}


def iter_rows(entry, progress=None):
    """(row number, the row as JSON text) of every row, streamed (files.iter_source)."""
    s = spec(entry)
    return files.iter_source(_where(s), progress, **_read_kwargs(s))


def count_rows(entry) -> int | None:
    """Rows in a local source, counted cheaply; None when unknown (hub data sets, unreadable files)."""
    s = spec(entry)
    return files.count_rows(s.path, s.split) if local_path(s) is not None else None


def fingerprint(entry, memo=None) -> dict:
    """The source's content (hashing.fingerprint; `memo`: where file hashes are remembered) and how it
    is read: format, mapping, mixture."""
    s = spec(entry)
    content = hashing.fingerprint(_where(s), **_read_kwargs(s), memo=memo)
    return {**content, "entry": dataclasses.asdict(s)} if isinstance(entry, DataSource) else content


def first_rows(entry, n: int = FIRST_ROWS) -> list[dict]:
    """The first `n` rows that are JSON objects (a line that is not is skipped here: the
    preparation reports it with its row number)."""
    values = (_loads(text) for _, text in itertools.islice(iter_rows(entry), n))
    return [v for v in values if isinstance(v, dict)]


def resolve_format(entry, where: str, columns, kind: str) -> str | None:
    """The source's format from its first row's columns; a UserError naming the key when it has none
    (or when its mapping names a column the row lacks). None: no row to tell (the empty source)."""
    s = spec(entry)
    fmt, problems = formats.resolve(columns, s.format, s.columns, kind, str(s))
    if problems:
        raise UserError([Problem(f"{where}.{k}" if k else where, what) for k, what in problems],
                        title=f"{where}: the rows of {s} do not fit")
    return fmt


def read_shaped(entry, kind: str = "sft") -> list[files.Row]:
    """All rows of a small source (evaluation prompts), each in the shape its format gives
    (ShareGPT and Alpaca rows as messages); a row that does not fit keeps its own shape."""
    s = spec(entry)
    rows = []
    for number, text in iter_rows(s):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(files.json_error(str(s), number, exc)) from None
        try:
            value = formats.to_shape(value, s.format, s.columns, kind)
        except RowError:
            pass  # the reader's own checks name what is wrong with it
        rows.append(files.Row(str(s), number, value))
    return rows


def detect_formats(entries: list, heads: dict[int, list[str]], kind: str, where: str) -> list[str]:
    """Each source's format from the first rows read of it (heads: source index -> JSON texts),
    logged; a source without a readable row keeps its setting (its read error comes later)."""
    out = []
    for i, entry in enumerate(entries):
        s = spec(entry)
        rows = [v for v in map(_loads, heads.get(i, [])) if isinstance(v, dict)]
        if not rows:
            out.append(s.format)
            continue
        fmt = resolve_format(s, f"{where}[{i}]", list(rows[0]), kind)
        log_format(f"{where}[{i}]", s, fmt, list(rows[0]))
        out.append(fmt)
    return out


def log_format(where: str, s: DataSource, fmt: str, columns: list) -> None:
    """Say which format a source is read as (validate and the preparation say it the same way)."""
    how = "as set" if s.format != "auto" else f"detected from its columns: {', '.join(map(str, columns))}"
    log.info("%s %s: format %s (%s)%s", where, s, fmt, how, f", columns {s.columns}" if s.columns else "")


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def write_rows(entries: list, path: Path, features, desc: str, payload) -> dict[int, list[str]]:
    """Every row of every source as (source index, row number, JSON text, error) into one Arrow file
    at `path` (finetune/data/prep.py's step 1): streamed, memory bounded by a batch. A source that
    cannot be read becomes one row with number 0 and `payload(error)`. Returns each source's first
    rows (their columns tell its format)."""
    from datasets.arrow_writer import ArrowWriter  # datasets: only when preparing (validate stays fast)
    from datasets.utils.tqdm import tqdm  # with ArrowWriter above

    local = [local_path(s) for s in entries]
    total = sum(p.stat().st_size for p in local if p is not None and p.is_file())
    heads: dict[int, list[str]] = {}
    writer = ArrowWriter(features=features, path=str(path), writer_batch_size=1000)
    batch = {c: [] for c in features}

    def add(source, number, text, error):
        for c, v in zip(features, (source, number, text, error)):
            batch[c].append(v)
        if len(batch["text"]) >= 1000:
            writer.write_batch(batch)
            for v in batch.values():
                v.clear()

    with tqdm(total=total or None, unit="B", unit_scale=True, desc=desc) as bar:
        for i, source in enumerate(entries):
            try:
                for number, text in iter_rows(source, progress=bar.update):
                    add(i, number, text, None)
                    if len(heads.setdefault(i, [])) < FIRST_ROWS:
                        heads[i].append(text)
            except UserError as exc:
                add(i, 0, None, payload(exc))
    if batch["text"]:
        writer.write_batch(batch)
    writer.finalize()
    writer.close()
    return heads
