"""Whole-recipe checks that need the disk or the model: everything `finetune validate` reports.

Structure (keys, types, choices) is checked in finetune/recipe/; here: the stage's sections,
files that must exist, the parent run of a DPO recipe (or its from_model: a checkpoint, an
export or a hub id; exactly one of the two), LoRA targets against the model's module
tree built on the meta device (no weights: instant even for Mixtral-8x7B), router options on a
dense model, the `sft:`/`dpo:` pass-through keys against trl.SFTConfig/DPOConfig (names, value
types read from TRL's dataclass, ranges training would reject, then the config itself is
built, which costs milliseconds), settings that cannot run here (fp16 without a GPU), eval
settings without eval data, loggers that are not installed, samples and early stopping
(watching.py), and an eval split that leaves less than one batch of training rows
(counted cheaply in local files). All problems are collected and raised together.

    finetune validate recipes/mixtral-8x7b/sft.yaml

Modules: passthrough.py (the TRL sections), resolve.py (the recipe a run records: absolute paths,
the aux-loss coefficient actually used), sources.py (data sources: first rows, format, mapping).
Layer: validate (below stages; imports train.args as a sibling, then load's layers downward).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from finetune import modeling, runs
from finetune.errors import Problem, UserError
from finetune.lora.targets import Targets, expected_trainable, resolve_targets
from finetune.moe import experts_modules
from finetune.qlora.checks import parameter_target_problems, recipe_problems
from finetune.recipe import Recipe
from finetune.runs import from_model
from finetune.validate.passthrough import check_eval_and_split, check_passthrough, check_trainer_config
from finetune.validate.sources import check_sources
from finetune.validate.watching import check_watching


@dataclass
class Checked:
    """What validation resolved, so a stage need not redo it."""

    recipe: Recipe
    stage: str
    config: object
    targets: Targets
    moe: bool
    trainable: dict | None = None
    """LoRA (and router) parameters per group, computed from the meta model's shapes."""


def stage_of(recipe: Recipe) -> str:
    return "dpo" if recipe.from_run or recipe.from_model or recipe.dpo else "sft"


def _check_stage_sections(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    if stage == "sft":
        if recipe.dpo:
            problems.append(Problem("dpo", "an SFT recipe has an `sft:` section, not `dpo:` (use `finetune dpo` for DPO)"))
        if recipe.from_run:
            problems.append(Problem("from_run", "only DPO recipes start from a run; `finetune sft` starts from model.name_or_path"))
        if recipe.from_model:
            problems.append(Problem("from_model", "only DPO recipes start from from_model; `finetune sft` starts from "
                                    "model.name_or_path"))
        if not recipe.model.name_or_path:
            problems.append(Problem("model.name_or_path", "required: a local model directory or a hub id"))
    else:
        if recipe.sft:
            problems.append(Problem("sft", "a DPO recipe has a `dpo:` section, not `sft:`"))
        if recipe.from_run and recipe.from_model:
            problems.append(Problem("from_model", f"given together with from_run `{recipe.from_run}`: a DPO stage starts "
                                    "from one of them; keep from_run (an SFT run of this tool) or from_model (any "
                                    "model), remove the other (--set from_run=null)"))
        elif not recipe.from_run and not recipe.from_model:
            problems.append(Problem("from_run", "required, or from_model: the SFT run directory this DPO stage starts "
                                    "from, or the model it starts from (a hub id, a local checkpoint or an export)"))
    if not recipe.output_dir:
        problems.append(Problem("output_dir", "required: where the run writes its adapter and metrics"))
    if not recipe.data.train:
        problems.append(Problem("data.train", "required: at least one training file or hub data set"))
    check_sources(recipe, stage, problems)  # files exist; first rows: format, mapping, samples (sources.py)
    template = recipe.model.chat_template
    if template and template.endswith(".jinja") and not Path(template).is_file():
        problems.append(Problem("model.chat_template", f"file not found: {template}"))


def inherit_from_parent(recipe: Recipe, problems: list[Problem]) -> Recipe:
    """A DPO recipe takes the base model (and its settings) from the SFT run it names."""
    try:
        parent = runs.read_run(recipe.from_run)
    except UserError as exc:
        problems.extend(Problem("from_run", str(p)) for p in exc.problems)
        return recipe
    resolved = copy.deepcopy(recipe)
    if recipe.model.name_or_path and recipe.model.name_or_path != parent.recipe.model.name_or_path:
        problems.append(
            Problem(
                "model.name_or_path",
                f"`{recipe.model.name_or_path}` differs from the SFT run's base `{parent.recipe.model.name_or_path}`; "
                "remove it (DPO uses the SFT run's base model)",
            )
        )
    resolved.model = copy.deepcopy(parent.recipe.model)
    return resolved


def inherit_from_model(recipe: Recipe, problems: list[Problem]) -> Recipe:
    """A DPO recipe with from_model starts from that model: it becomes model.name_or_path (the rest of
    the recipe's model section applies to it). A local folder must be a checkpoint (config.json),
    not a run of this tool; an export's record must be readable. A hub id is checked like any
    model name (the config from the hub cache, the bundled copies or the hub; no weights)."""
    name = recipe.from_model
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            problems.append(Problem("from_model", f"{name} is a file; name a checkpoint folder, an export or a hub id"))
        elif runs.is_run(path):
            problems.append(Problem("from_model", f"{name} is a run of this tool (chain.json): it holds an adapter, not a "
                                    "model; name it in from_run instead (and remove from_model)"))
        elif not (path / "config.json").is_file():
            problems.append(Problem("from_model", f"{name} has no config.json: not a model checkpoint (save the model "
                                    "with save_pretrained, or export the run with `finetune export`)"))
        else:
            try:
                from_model.export_record(path)
            except UserError as exc:
                problems.extend(Problem("from_model", str(p)) for p in exc.problems)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        problems.append(Problem("from_model", f"{name}: no such local directory (relative paths are read from {Path.cwd()})"))
    resolved = copy.deepcopy(recipe)
    own = recipe.model.name_or_path
    if own and own != name and not (path.exists() and Path(own).exists() and Path(own).resolve() == path.resolve()):
        problems.append(Problem("model.name_or_path", f"`{own}` differs from from_model `{name}`; remove it (DPO starts "
                                "from from_model)"))
    resolved.model.name_or_path = name
    return resolved


def _rekey(found: list[Problem], key: str) -> list[Problem]:
    """modeling's messages name model.name_or_path; from a from_model recipe they are about from_model."""
    if not key:
        return found
    return [Problem(key, str(p).removeprefix("model.name_or_path: ")) if not p.where else p for p in found]


def check(recipe: Recipe, stage: str | None = None) -> Checked:
    """Every problem with the recipe, raised at once as a UserError; else what was resolved."""
    stage = stage or stage_of(recipe)
    problems: list[Problem] = list(recipe.problems)
    _check_stage_sections(recipe, stage, problems)
    check_passthrough(recipe, stage, problems)
    check_watching(recipe, stage, problems)  # loggers, samples, early stopping
    passthrough_ok = not any(p.where.split(".")[0] == stage for p in problems)
    if passthrough_ok and isinstance(recipe.data.eval, list):
        check_eval_and_split(recipe, stage, problems)
    # the config takes the seed, max_length and the pass-through section: build it only when they are well-typed
    if passthrough_ok and not any(p.where.split(".")[0] in (stage, "seed", "data") for p in problems):
        check_trainer_config(recipe, stage, problems)
    own_model = recipe.model
    model_ok = True  # False: from_model's folder is no checkpoint (reported), so there is no config to load
    # a from_run/from_model of another type than text is a structural problem already (recipe.problems)
    if stage == "dpo" and recipe.from_run and isinstance(recipe.from_run, str):
        recipe = inherit_from_parent(recipe, problems)
    elif stage == "dpo" and recipe.from_model and isinstance(recipe.from_model, str) and not recipe.from_run:
        before = len(problems)
        recipe = inherit_from_model(recipe, problems)
        model_ok = not any(p.where == "from_model" for p in problems[before:])
    # with from_model, what goes wrong loading the model's config is from_model's problem
    key = "from_model" if stage == "dpo" and recipe.from_model and not recipe.from_run else ""
    if not any(p.where == "model.quantization" for p in recipe.problems):  # QLoRA's own rules (finetune/qlora/checks.py)
        problems.extend(recipe_problems(recipe, own_model if stage == "dpo" else None))
    config, targets, moe, trainable = None, Targets(), False, None
    if recipe.model.name_or_path and model_ok:
        try:
            config = modeling.load_config(recipe.model)
        except UserError as exc:
            problems.extend(_rekey(exc.problems, key))
    # Matching targets needs well-typed model/lora/router sections; their type errors are reported already.
    typed = not any(p.where.split(".")[0].split("[")[0] in ("model", "lora", "router") for p in recipe.problems)
    if config is not None and typed:
        moe = modeling.is_moe(config)
        try:
            model = modeling.meta_model(config, recipe.model.trust_remote_code)
        except UserError as exc:
            problems.extend(_rekey(exc.problems, key))
        else:
            # the module tree decides too: config field names for the expert count differ by family
            moe = moe or bool(experts_modules(model))
            targets, target_problems = resolve_targets(recipe.lora, recipe.router, model, moe)
            trainable = expected_trainable(model, targets)
            problems.extend(target_problems)
            problems.extend(parameter_target_problems(recipe, targets, model, moe))  # 4-bit DPO stacks adapters
    if problems:
        raise UserError(problems, title=f"{recipe.source or 'recipe'}: {len(problems)} problem(s)")
    return Checked(recipe=recipe, stage=stage, config=config, targets=targets, moe=moe, trainable=trainable)
