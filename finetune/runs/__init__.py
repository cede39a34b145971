"""Run directories: what a stage writes, and how a later stage (or export) reads it back.

    runs/<name>/
      recipe.yaml          the fully resolved recipe (absolute paths, resolved defaults)
      adapter_config.json  \\ the LoRA adapter in standard PEFT format
      adapter_model.safetensors /
      tokenizer files      with the chat template
      metrics.json         final losses, tokens seen, trainable parameters per group, timings
      data_report.json     per data source (`sources`): format, rows read, usable, used by the mixture
      chain.json           base model -> SFT run -> DPO run, so export can rebuild the model
      logs/                the loggers' files (report_to: tensorboard, wandb, mlflow, trackio)
      samples.jsonl        greedy answers while training (recipe `samples:`), one {step, prompt, answer} a line

A run directory is complete only when chain.json exists: it is written last, and the directory
is renamed into place only after that (finetune/runs/outputs.py). chain.json is a list, oldest first:
[{"kind": "base", "model": ...}, {"kind": "sft", "run": "../sft", "sha256": ...}, {"kind": "dpo",
"run": ".", "sha256": ...}]; a DPO run that started from a model (`from_model:`) has that model as
its base entry, marked `"from_model": true` (finetune/runs/from_model.py). Runs are named
relative to the run holding the chain when they sit side by side (same parent directory),
absolute otherwise, so `cp -r runs runs2` or `mv` gives a run that rebuilds from its own files;
each adapter's sha256 is checked whenever the chain is rebuilt. A run's recipe.yaml names its from_run the same way (relative to the run directory).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import Problem, UserError
from finetune.recipe import Recipe, recipe_from_dict, recipe_to_dict
from finetune.runs.outputs import staging_dir

ADAPTER_FILE = "adapter_model.safetensors"
STAGES = ("sft", "dpo")


@dataclass
class Run:
    path: Path
    recipe: Recipe
    chain: list[dict]
    """Oldest first: [{"kind": "base", "model": ...}, {"kind": "sft", "run": <absolute>, "sha256": ...}, ...]."""
    metrics: dict


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_link(target: Path, run: Path) -> str:
    """How `run`'s files name `target`: ".", "../<name>" for a sibling, else the absolute path."""
    target, run = Path(target).resolve(), Path(run).resolve()
    if target == run:
        return "."
    if target.parent == run.parent:
        return f"../{target.name}"
    return str(target)


def _read_chain(path: Path) -> list[dict]:
    chain_file = path / "chain.json"
    try:
        chain = json.loads(chain_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{chain_file}: not valid JSON ({exc}); the run directory is damaged, run its stage again") from None
    ok = (isinstance(chain, list) and len(chain) >= 2 and all(isinstance(x, dict) for x in chain)
          and chain[0].get("kind") == "base" and isinstance(chain[0].get("model"), str)
          and all(x.get("kind") in STAGES and isinstance(x.get("run"), str) for x in chain[1:]))
    if not ok:
        raise UserError(f"{chain_file}: not a run chain (expected a list: a base entry, then one entry per stage "
                        f"with `kind` and `run`); the run directory is damaged, run its stage again")
    resolved = [dict(chain[0])]
    for link in chain[1:]:
        # A relative name is relative to the run that holds the chain (absolute names pass through).
        resolved.append({**link, "run": str((path / link["run"]).resolve())})
    return resolved


def _read_recipe(path: Path) -> Recipe:
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file():
        raise UserError(f"{recipe_file}: missing; {path} is not a complete run (run its stage again)")
    try:
        data = yaml.safe_load(recipe_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{recipe_file}: not valid YAML ({str(exc).splitlines()[0]}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{recipe_file}: not a recipe (expected a mapping); the run directory is damaged")
    problems: list[Problem] = []
    recipe = recipe_from_dict(data, problems)
    if problems:
        raise UserError(problems, title=f"{recipe_file} is not a valid resolved recipe")
    return recipe


def read_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory not found: {path} (run the stage that writes it first)")
    path = path.resolve()
    if not (path / "chain.json").is_file():
        hint = ""
        if staging_dir(path).is_dir():
            hint = f"; an interrupted run is in {staging_dir(path)} (continue it with --resume)"
        raise UserError(f"{path} is not a finished run: chain.json is missing (the run was interrupted, or this is "
                        f"not a run directory){hint}")
    chain = _read_chain(path)
    recipe = _read_recipe(path)
    recipe.output_dir = str(path)  # where the run is now, after any cp/mv
    if recipe.from_run and len(chain) >= 3:
        recipe.from_run = chain[-2]["run"]  # the parent as this run's chain names it, not where it once was
    metrics_file = path / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{metrics_file}: not valid JSON; the run directory is damaged") from None
    return Run(path=path, recipe=recipe, chain=chain, metrics=metrics)


def is_run(path: str | Path) -> bool:
    return (Path(path) / "chain.json").is_file()


def adapter_dirs(run: Run) -> list[Path]:
    """The run directories of every adapter in the chain, oldest first."""
    return [Path(link["run"]) for link in run.chain if link["kind"] != "base"]


def check_adapter_hashes(run: Run) -> None:
    """Every adapter of the chain is there, readable, and the file its chain recorded (sha256)."""
    for link in run.chain[1:]:
        folder = Path(link["run"])
        config = folder / "adapter_config.json"
        try:
            json.loads(config.read_text())
        except FileNotFoundError:
            raise UserError(f"{config}: missing; the run chain of {run.path} is incomplete") from None
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{config}: not valid JSON; the adapter of {folder} is damaged, run its stage again") from None
        weights = folder / ADAPTER_FILE
        if not weights.is_file():
            raise UserError(f"{weights}: missing; the run chain of {run.path} is incomplete")
        if link.get("sha256") and sha256(weights) != link["sha256"]:
            raise UserError(f"{weights}: its sha256 differs from the one {run.path / 'chain.json'} recorded; the file "
                            f"was changed or truncated (e.g. an incomplete copy): copy it again or rerun that stage")


def new_chain(out: Path, kind: str, parent_chain: list[dict], adapter_sha: str) -> list[dict]:
    """The chain.json of a new run at `out` on top of `parent_chain` (resolved links, oldest first)."""
    links = [dict(parent_chain[0])]
    links += [{**link, "run": relative_link(Path(link["run"]), out)} for link in parent_chain[1:]]
    return links + [{"kind": kind, "run": ".", "sha256": adapter_sha}]


def write_run_files(staging: Path, out: Path, recipe: Recipe, chain: list[dict], metrics: dict) -> None:
    """recipe.yaml, metrics.json, then chain.json last, into the staging directory of `out`."""
    data = recipe_to_dict(recipe)
    if recipe.from_run:
        data["from_run"] = relative_link(Path(recipe.from_run), out)
    (staging / "recipe.yaml").write_text(
        "# Resolved recipe of this run; from_run is relative to this run directory.\n"
        + yaml.safe_dump(data, sort_keys=False))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (staging / "chain.json").write_text(json.dumps(chain, indent=2))
