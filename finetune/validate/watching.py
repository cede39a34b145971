"""Checks of what watches a run: the loggers (`report_to`), `samples:` and `early_stopping:`.

    finetune validate recipes/mixtral-8x7b/sft.yaml   # e.g. "sft.report_to: tensorboard is not installed: pip install 'finetune[tensorboard]'"

All before any weights load: a logger that is not installed used to fail after the model had
loaded (transformers raises in the Trainer's constructor).
Layer: validate; imports train (sibling), data, recipe, errors.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data.files import LOCAL_SUFFIXES
from finetune.errors import Problem
from finetune.recipe import Recipe
from finetune.train import loggers
from finetune.validate.passthrough import has_eval_data


def check_watching(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    section = getattr(recipe, stage)
    if isinstance(section, dict):
        problems.extend(loggers.problems(section, stage))
    samples, stopping = recipe.samples, recipe.early_stopping
    if samples:
        prompts = samples.prompts
        if isinstance(prompts, str):
            if Path(prompts).suffix not in LOCAL_SUFFIXES:
                problems.append(Problem("samples.prompts", f"`{prompts}`: a .jsonl, .json or .parquet file of prompts, "
                                        "or a count of eval rows"))
            elif not Path(prompts).is_file():
                problems.append(Problem("samples.prompts", f"file not found: {prompts} (relative to {Path.cwd()})"))
        elif isinstance(prompts, int) and not recipe.data.eval:
            problems.append(Problem("samples.prompts", f"a count ({prompts}) takes the first rows of data.eval, and "
                                    "data.eval is empty: give data.eval, or a prompts file"))
    if stopping:
        if not has_eval_data(recipe):
            problems.append(Problem("early_stopping.metric", f"`{stopping.metric}` is never logged: there is no eval "
                                    "data; set data.eval or data.eval_split, or remove early_stopping"))
        if isinstance(section, dict) and section.get("eval_strategy") == "no":
            problems.append(Problem("early_stopping", f"{stage}.eval_strategy is `no`: nothing is evaluated, so "
                                    "nothing can stop; remove one of them"))
