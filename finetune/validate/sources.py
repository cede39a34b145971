"""finetune validate's data-source checks: every local source's first rows read (nothing loads a
model or prepares data) to check that it exists, that its format is found (or fits the one set),
that its `columns:` mapping names columns it has, and that `samples` without replacement fits it.

    finetune validate recipes/tiny-moe/sft.yaml

Hub data sets are not read here (that would download them); their format name and mapping keys are
checked, and the preparation checks their columns before it converts a row.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data import formats, sources
from finetune.errors import Problem, UserError
from finetune.recipe import DataSource, Recipe


def check_sources(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    kind = "sft" if stage == "sft" else "preference"
    for key in ("train", "eval"):
        entries = getattr(recipe.data, key)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if isinstance(entry, (str, DataSource)):
                problems.extend(_check_one(entry, f"data.{key}[{i}]", kind))


def _check_one(entry, where: str, kind: str) -> list[Problem]:
    s = sources.spec(entry)
    if bool(s.path) == bool(s.name) or s.format not in (*formats.FORMATS, "auto"):
        return []  # reported by the recipe's structural checks (finetune/recipe/sources.py)
    path = sources.local_path(s)
    columns = None
    if path is not None:
        if not path.exists():
            return [Problem(where, f"file not found: {s.path} (relative to {Path.cwd()})")]
        given = [k for k in ("config", "split", "data_files") if getattr(s, k)]
        if path.is_file() and given:  # it would be ignored: say so rather than read the whole file
            return [Problem(f"{where}.{k}", f"applies to hub data sets and folders; {s.path} is a file: remove it")
                    for k in given]
        try:
            rows = sources.first_rows(s)
        except UserError as exc:
            return [Problem(where, p.what if not p.where else f"{p.where}: {p.what}") for p in exc.problems]
        columns = list(rows[0]) if rows else None  # an empty file: the preparation says so
    fmt, found = formats.resolve(columns, s.format, s.columns, kind, str(s))
    if fmt is not None:
        sources.log_format(where, s, fmt, columns)
    problems = [Problem(f"{where}.{k}" if k else where, what) for k, what in found]
    if path is not None and isinstance(s.samples, int) and not s.replace:
        rows_in = sources.count_rows(s)
        if rows_in is not None and s.samples > rows_in:
            problems.append(Problem(f"{where}.samples", f"{s.samples} rows asked of {s}, which has {rows_in}; lower "
                                    "samples, or set replace: true to draw with replacement"))
    return problems
