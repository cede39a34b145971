"""Mixtures: how many rows each source of data.train (or data.eval) gives, and which, seeded.

    finetune sft R.yaml     # finetune/data/prep.py draws after checking the rows; the counts are
                            # logged and written to <run>/data_report.json (key `sources`)

Per source, over its usable rows (bad rows dropped, so the counts are rows trained on):
- neither weight nor samples: every row (the default; then no source of the list has a weight);
- `samples: N`: N rows drawn without replacement; more than the source has is an error unless
  `replace: true`, which draws all N with replacement;
- `weight: w`: the weighted sources share w / sum(w) of their part of the mixture, whose size is the
  largest that no weighted source runs out of (as datasets.interleave_datasets with probabilities
  stops at the first exhausted source), drawn without replacement. By hand rather than with
  interleave_datasets: its counts are random draws; these are exact (largest remainder), so the
  recipe's shares are the shares trained on, and the same seed gives the same rows.
"""

from __future__ import annotations

import math

import numpy as np

from finetune.errors import Problem, UserError
from finetune.recipe import DataSource


def mixed(specs: list[DataSource]) -> bool:
    return any(s.weight is not None or s.samples is not None for s in specs)


def counts(sizes: list[int], specs: list[DataSource], where: str) -> list[int]:
    """Rows taken of each source (sizes: its usable rows); a UserError when samples cannot be met."""
    out = list(sizes)
    problems = []
    for i, (size, s) in enumerate(zip(sizes, specs)):
        if s.samples is not None:
            if size == 0:
                problems.append(Problem(f"{where}[{i}].samples", f"{s} has no usable row to draw from"))
            elif s.samples > size and not s.replace:
                problems.append(Problem(f"{where}[{i}].samples", f"{s.samples} rows asked of {s}, which has {size} "
                                        "usable row(s); lower samples, or set replace: true to draw with replacement"))
            out[i] = s.samples
    weighted = [i for i, s in enumerate(specs) if s.weight is not None]
    total_weight = sum(specs[i].weight for i in weighted)
    if weighted and total_weight > 0:
        shares = {i: specs[i].weight / total_weight for i in weighted}
        total = min(math.floor(sizes[i] / p) for i, p in shares.items() if p > 0)
        exact = {i: total * p for i, p in shares.items()}
        taken = {i: math.floor(x) for i, x in exact.items()}
        # largest remainder: the rows floor() left over go to the largest fractional parts
        for i in sorted(exact, key=lambda i: (taken[i] - exact[i], i))[: total - sum(taken.values())]:
            taken[i] += 1
        for i in weighted:
            out[i] = taken[i]
        if total == 0:
            empty = [str(specs[i]) for i, p in shares.items() if p > 0 and sizes[i] == 0]
            problems.append(Problem(where, f"the weighted mixture is empty: {', '.join(empty)} has no usable row"))
    if problems:
        raise UserError(problems, title="the mixture cannot be drawn")
    return out


def draw(sizes: list[int], specs: list[DataSource], seed: int, where: str) -> list[np.ndarray]:
    """Per source, the positions (among its usable rows, in order) of the rows taken; seeded by the
    recipe seed and the source's place in the list, so a source's draw does not depend on the others'."""
    taken = counts(sizes, specs, where)
    out = []
    for i, (size, n, s) in enumerate(zip(sizes, taken, specs)):
        if n == size and not s.replace:
            out.append(np.arange(size))
            continue
        rng = np.random.default_rng([seed, i])
        out.append(np.sort(rng.choice(size, size=n, replace=bool(s.replace and n > 0))))
    return out


def take(source, ok, specs: list[DataSource], seed: int, where: str, shapes: list[str]) -> tuple[np.ndarray | None, list[dict]]:
    """The rows of a converted split to keep: its usable rows (`ok`), drawn per source as the mixture
    says. source/ok: per row, its source index and whether it converted (pyarrow or numpy arrays).
    Returns (row indices, or None when every row stays; per source what it gave, for the report)."""
    source, ok = np.asarray(source), np.asarray(ok, dtype=bool)
    positions = [np.flatnonzero(ok & (source == i)) for i in range(len(specs))]
    sizes = [len(p) for p in positions]
    picks = draw(sizes, specs, seed, where) if mixed(specs) else [np.arange(n) for n in sizes]
    report = []
    for i, (s, size, pick) in enumerate(zip(specs, sizes, picks)):
        entry = {"where": f"{where}[{i}]", "source": str(s), "format": shapes[i], "rows_read": int((source == i).sum()),
                 "usable": size, "used": len(pick)}
        report.append(entry | {k: getattr(s, k) for k in ("weight", "samples") if getattr(s, k) is not None}
                      | ({"replace": True} if s.replace else {}))
    if not mixed(specs) and ok.all():
        return None, report
    return np.concatenate([p[k] for p, k in zip(positions, picks)] or [np.zeros(0, dtype=np.int64)]), report
