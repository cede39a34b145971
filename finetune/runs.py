"""Run directories: what a stage writes, and how a later stage (or export) reads it back.

    runs/<name>/
      recipe.yaml          the fully resolved recipe (absolute paths, resolved defaults)
      adapter_config.json  \\ the LoRA adapter in standard PEFT format
      adapter_model.safetensors /
      tokenizer files      with the chat template
      metrics.json         final losses, tokens seen, trainable parameters per group, timings
      chain.json           base model -> SFT run -> DPO run, so export can rebuild the model

A run directory is complete only when chain.json exists: it is written last.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import Problem, UserError
from finetune.recipe import Recipe, recipe_from_dict, write_recipe


@dataclass
class Run:
    path: Path
    recipe: Recipe
    chain: list[dict]
    """Oldest first: [{"kind": "base", "model": ...}, {"kind": "sft", "run": ...}, ...]."""
    metrics: dict


def read_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory not found: {path} (run the stage that writes it first)")
    chain_file = path / "chain.json"
    if not chain_file.is_file():
        raise UserError(f"{path} is not a finished run: chain.json is missing (the run was interrupted, or this is not a run directory)")
    problems: list[Problem] = []
    recipe = recipe_from_dict(yaml.safe_load((path / "recipe.yaml").read_text()), problems)
    if problems:
        raise UserError(problems, title=f"{path}/recipe.yaml is not a valid resolved recipe")
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Run(path=path, recipe=recipe, chain=json.loads(chain_file.read_text()), metrics=metrics)


def is_run(path: str | Path) -> bool:
    return (Path(path) / "chain.json").is_file()


def prepare_output_dir(path: str | Path, overwrite: bool) -> Path:
    """An empty output directory; refuses to mix a new run into a finished one."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise UserError(
                f"output_dir {path} already holds files; choose another output_dir "
                f"(--set output_dir=...) or pass --overwrite to replace it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def finish_run(path: Path, recipe: Recipe, chain: list[dict], metrics: dict) -> None:
    write_recipe(recipe, path / "recipe.yaml")
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (path / "chain.json").write_text(json.dumps(chain, indent=2))
