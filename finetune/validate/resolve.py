"""The recipe a run records: validated, local paths absolute, the aux-loss coefficient actually used.

    finetune sft RECIPE          # stages resolve first; `pipeline --resume` compares with what a run recorded
Layer: validate.
"""

from __future__ import annotations

import copy
from pathlib import Path

from finetune import modeling
from finetune.recipe import DataSource, Recipe
from finetune.validate import check


def resolved_recipe(recipe: Recipe, stage: str):
    """(checked, recipe as the run records it): validated, local paths absolute, and the router
    aux-loss coefficient actually used. What run_sft/run_dpo train with, and what `pipeline
    --resume` compares a finished run's recipe.yaml with."""
    checked = check(recipe, stage)
    out = absolute(checked.recipe)
    out.router.aux_loss_coef = resolve_aux_coef(out, checked.config)
    return checked, out


def resolve_aux_coef(recipe: Recipe, config) -> float:
    """The router aux-loss coefficient: the recipe's, else the model config's, else 0 (dense)."""
    if recipe.router.aux_loss_coef is not None:
        return float(recipe.router.aux_loss_coef)
    return float(getattr(modeling.text_config(config), "router_aux_loss_coef", 0.0) or 0.0)


def absolute(recipe: Recipe) -> Recipe:
    """The recipe with local paths made absolute, so the run directory works from anywhere."""
    out = copy.deepcopy(recipe)

    def fix(p: str) -> str:
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    out.model.name_or_path = fix(out.model.name_or_path)
    if out.model.chat_template and out.model.chat_template.endswith(".jinja"):
        out.model.chat_template = fix(out.model.chat_template)
    for entries in (out.data.train, out.data.eval):
        for i, entry in enumerate(entries):
            if isinstance(entry, DataSource):  # a mapping: its path and its local data files
                entry.path, entry.data_files = fix(entry.path), [fix(f) for f in entry.data_files]
            else:
                entries[i] = fix(entry)
    out.output_dir = str(Path(out.output_dir).resolve())
    if out.from_run:
        out.from_run = fix(out.from_run)
    if out.from_model:
        out.from_model = fix(out.from_model)
    return out
