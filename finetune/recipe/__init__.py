"""Recipes: the typed schema, YAML loading, `--set` overrides, and the structural checks.

A recipe is one YAML file per stage (recipes/<model>/sft.yaml, recipes/<model>/dpo.yaml). This
module turns it into a `Recipe` and collects every structural problem (unknown key with a
did-you-mean, wrong type, bad choice) with its dotted key path. Checks that need the model or
the disk (files exist, LoRA targets match) live in finetune/validate/.
Modules: schema.py (the sections), structure.py (types, choices, ranges), sources.py (data sources:
format and mixture settings), yaml_io.py (YAML, --set).

    finetune validate recipes/tiny-moe/sft.yaml
Layer: recipe (imports errors only).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from finetune.errors import Problem, UserError
from finetune.recipe.schema import (  # noqa: F401  (the schema is this package's public face)
    ATTENTION_TARGETS,
    DENSE_MLP_TARGETS,
    EXPERT_ALIASES,
    EXPERT_TARGETS,
    DataSection,
    DataSource,
    LoraGroup,
    LoraSection,
    ModelSection,
    Recipe,
    RouterSection,
)
from finetune.recipe.sources import FORMATS, check_sources  # noqa: F401
from finetune.recipe.structure import CHOICES, build, check_choices  # noqa: F401
from finetune.recipe.yaml_io import BOOL_HINT, YAML11_BOOLS, apply_overrides, load_yaml  # noqa: F401


def read_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe; structural problems are kept in `recipe.problems` for validate.check to report.

    Raises UserError only when there is nothing to check: no file, not YAML, not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path} (relative paths are read from {Path.cwd()})")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte offset {exc.start}); save the recipe as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, data, lora, ...), got {type(raw).__name__}")
    problems = apply_overrides(raw, list(overrides))
    problems += [p for section in ("sft", "dpo") for p in non_finite(raw.get(section), section)]
    recipe = recipe_from_dict(raw, problems)
    recipe.source = str(path)
    recipe.problems = problems
    return recipe


def non_finite(node, where: str = "") -> list[Problem]:
    """NaN and infinities anywhere under `node` (the sft:/dpo: pass-through sections, which no
    dataclass of ours describes; typed fields are checked in _check_value, "NaN" strings too)."""
    if isinstance(node, float) and not math.isfinite(node):
        return [Problem(where, f"must be a finite number, got {node}")]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in non_finite(v, f"{where}[{i}]")]
    return []


def recipe_from_dict(raw: dict, problems: list[Problem]) -> Recipe:
    recipe = build(Recipe, raw, "", problems)
    check_choices(recipe, problems)
    check_sources(recipe, problems)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The YAML-ready mapping of a recipe (what a run writes as recipe.yaml)."""
    out = {}
    for f in dataclasses.fields(recipe):
        if f.metadata.get("internal"):
            continue
        value = getattr(recipe, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out
