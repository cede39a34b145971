"""Structural checks of data.train / data.eval entries written as mappings: where the rows come from,
which format, and the mixture settings (weight, samples, replace). No file is read here; the checks
that read a source's first rows (format detection, column mapping, samples against the source's rows)
are finetune/validate/sources.py's.

    finetune validate recipes/tiny-moe/sft.yaml
Layer: recipe.
"""

from __future__ import annotations

import math

from finetune.errors import Problem, did_you_mean
from finetune.recipe.schema import DataSource, Recipe

FORMATS = ("auto", "messages", "prompt_completion", "sharegpt", "alpaca", "preference")
"""A source's `format` choices; finetune/data/formats.py implements each (a test keeps the two in step)."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sources(recipe: Recipe, problems: list[Problem]) -> None:
    for key in ("train", "eval"):
        entries = getattr(recipe.data, key)
        if isinstance(entries, list):
            _check_list(entries, f"data.{key}", problems)


def _check_list(entries: list, where: str, problems: list[Problem]) -> None:
    weighted = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, DataSource):
            continue
        at = f"{where}[{i}]"
        if bool(entry.path) == bool(entry.name):
            problems.append(Problem(at, "give `path` (a local file or folder, or hub/name) or `name` (a hub data set)"
                                    + (", not both" if entry.path else "")))
        if isinstance(entry.format, str) and entry.format not in FORMATS:
            problems.append(Problem(f"{at}.format", f"`{entry.format}` is not one of {', '.join(FORMATS)}"
                                    + did_you_mean(entry.format, FORMATS)))
        if entry.weight is not None and entry.samples is not None:
            problems.append(Problem(at, "weight and samples are both set; give one (weight: a share of the mixture, "
                                    "samples: a number of rows)"))
        if _number(entry.weight):
            weighted.append(i)
            if entry.weight < 0:
                problems.append(Problem(f"{at}.weight", f"must be >= 0, got {entry.weight}"))
        if _number(entry.samples) and entry.samples < 1:
            problems.append(Problem(f"{at}.samples", f"must be at least 1, got {entry.samples}"))
        if entry.replace is True and entry.samples is None:
            problems.append(Problem(f"{at}.replace", "applies to `samples` only; set samples, or remove replace"))
    if not weighted:
        return
    weights = [entries[i].weight for i in weighted]
    if all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) == 0:
        problems.append(Problem(where, "the weights sum to 0; give at least one source a positive weight"))
    for i, entry in enumerate(entries):
        if isinstance(entry, str) or (isinstance(entry, DataSource) and entry.weight is None and entry.samples is None):
            problems.append(Problem(f"{where}[{i}]", f"{where}[{weighted[0]}] has a weight, so every source of "
                                    "the list needs a `weight` (its share) or `samples` (its rows); write it as "
                                    f"{{path: {entry}, weight: ...}}"))
