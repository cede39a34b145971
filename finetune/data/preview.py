"""`finetune data`: look at a recipe's data as training will see it, before any weights load.

    finetune data recipes/tiny-moe/sft.yaml [--stage sft|dpo] [--show 3] [--output data-reports/sft]

Prepares the data exactly as `finetune sft`/`finetune dpo` do (prep.build_datasets, the same cache
entry, which training then finds), with the tokenizer only, and prints: rows read, kept and used
per source, dropped and changed by reason; the token-length distribution of the rows as trained
(percentiles, and a PNG histogram at the path it prints); N rows rendered with their trained
tokens marked (colour on a terminal, ⟦brackets⟧ otherwise). Like axolotl's `preprocess --debug`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from finetune import modeling, runs
from finetune.data.convert import trl_ids
from finetune.data.prep import build_datasets
from finetune.errors import UserError
from finetune.recipe import ModelSection, Recipe

OPEN, CLOSE = "⟦", "⟧"  # not "[ ]": chat templates write [INST] ... [/INST] themselves
GREEN, RESET = "\x1b[1;32m", "\x1b[0m"
PERCENTILES = (50, 90, 95, 99)


def colour_wanted(stream) -> bool:
    """ANSI colour on a terminal, unless NO_COLOR is set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def stage_tokenizer(recipe: Recipe, stage: str):
    """The tokenizer the stage trains with: DPO from_run takes the SFT run's (as stages/dpo.py does)."""
    section = recipe.model
    if stage == "dpo" and recipe.from_run:
        parent = runs.read_run(recipe.from_run)
        section = ModelSection(**{**recipe.model.__dict__, "name_or_path": str(parent.path)})
    return modeling.load_tokenizer(section)


def preview(recipe: Recipe, stage: str, show: int, output: Path, colour: bool = False) -> list[str]:
    """Prepare the recipe's data for `stage` and return the lines to print (the PNG is written)."""
    tokenizer = stage_tokenizer(recipe, stage)
    kind = "sft" if stage == "sft" else "preference"
    num_proc = getattr(recipe, stage).get("dataset_num_proc")
    train, eval_ds, report = build_datasets(recipe.data, tokenizer, kind, recipe.seed, num_proc)
    data = recipe.data
    lines = [f"{stage} data, data.max_length {data.max_length}, data.too_long {data.too_long}, data.bad_rows {data.bad_rows}:"]
    lines += source_lines(report)
    lines.append(f"rows: {len(train)} train" + (f", {len(eval_ds)} eval" if eval_ds is not None else ""))
    if kind == "sft":
        lengths = np.array([len(ids) for ids in train["input_ids"]])
        marked = [(ids, mask) for ids, mask in sft_tokens(train, show)]
    else:
        pairs = [trl_ids(tokenizer, row) for row in train]
        lengths = np.array([min(max(len(f) for f in full), data.max_length) for _, full in pairs])
        marked = [pair_tokens(prompt, full[0], data.max_length) for prompt, full in pairs[:show]]
    lines += length_lines(lengths, data.max_length)
    png = write_histogram(lengths, data.max_length, output / f"lengths-{stage}.png", stage)
    lines.append(f"histogram: {png}")
    if marked:
        lines.append("trained tokens " + ("in green" if colour else f"between {OPEN} and {CLOSE}")
                     + (" (DPO: the chosen completion; TRL truncates to max_length)" if kind != "sft" else ""))
    for i, (ids, mask) in enumerate(marked, start=1):
        lines += [f"--- train row {i} of {len(train)} ({len(ids)} tokens, {sum(mask)} trained)",
                  render_marked(tokenizer, ids, mask, colour)]
    return lines


def source_lines(report) -> list[str]:
    lines = []
    for s in report.sources:
        lines.append(f"{s['where']} {s['source']} ({s['format']}): {s['rows_read']} rows read, {s['usable']} kept, "
                     f"{s['used']} used")
        for group in ("dropped", "changed"):
            if s.get(group):
                lines.append(f"    {group}: " + ", ".join(f"{n} {reason}" for reason, n in s[group].items()))
    lines += [f"  dropped {p}" for p in report.dropped[:3]]
    if len(report.dropped) > 3:
        lines.append(f"  ... and {len(report.dropped) - 3} more dropped")
    return lines


def sft_tokens(train, show: int):
    """(ids, trained mask) of the first rows; without assistant_only_loss every token is trained."""
    for row in train.select(range(min(show, len(train)))):
        yield row["input_ids"], row.get("assistant_masks") or [1] * len(row["input_ids"])


def pair_tokens(prompt_length: int, full: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """prompt+chosen as TRL's collator builds it: completion tokens trained, cut to max_length."""
    mask = [0] * prompt_length + [1] * (len(full) - prompt_length)
    return full[:max_length], mask[:max_length]


def length_lines(lengths: np.ndarray, max_length: int) -> list[str]:
    if len(lengths) == 0:
        return ["token lengths: no rows"]
    cuts = ", ".join(f"p{q} {int(v)}" for q, v in zip(PERCENTILES, np.percentile(lengths, PERCENTILES)))
    at_limit = int((lengths >= max_length).sum())
    line = (f"token lengths ({len(lengths)} train rows, as trained): min {lengths.min()}, mean {lengths.mean():.0f}, "
            f"{cuts}, max {lengths.max()}; {at_limit} at data.max_length {max_length}")
    return [line]


def render_marked(tokenizer, ids: list[int], mask: list[int], colour: bool) -> str:
    """The row's text with its trained runs marked. A run's text is the difference of decoding the
    ids before and through it, so spaces that a decoder drops at a string's start stay right."""
    bounds = [0] + [k for k in range(1, len(ids)) if mask[k] != mask[k - 1]] + [len(ids)]
    out, done = [], ""
    for a, b in itertools.pairwise(bounds):
        through = tokenizer.decode(ids[:b], skip_special_tokens=False)
        text = through[len(done):] if through.startswith(done) else tokenizer.decode(ids[a:b], skip_special_tokens=False)
        done = through
        if mask[a]:
            text = f"{GREEN}{text}{RESET}" if colour else f"{OPEN}{text}{CLOSE}"
        out.append(text)
    return "".join(out)


def write_histogram(lengths: np.ndarray, max_length: int, path: Path, stage: str) -> Path:
    """A PNG histogram of the row lengths, written beside and renamed (no half-written file)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: only this command draws
        from matplotlib.figure import Figure  # (as above)
    except ImportError:
        raise UserError("`finetune data` draws its histogram with matplotlib, which is not installed: "
                        "pip install matplotlib (a dependency of this package)") from None
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(50, max(1, len(set(lengths.tolist())))), color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"data.max_length {max_length}")
    ax.set_xlabel("tokens per row (as trained)")
    ax.set_ylabel("rows")
    ax.set_title(f"{stage} train rows: {len(lengths)}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path
