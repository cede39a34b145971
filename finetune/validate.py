"""Whole-recipe checks that need the disk or the model: everything `finetune validate` reports.

Structure (keys, types, choices) is checked in finetune/recipe.py; here: the stage's sections,
files that must exist, the parent run of a DPO recipe, LoRA targets against the model's module
tree built on the meta device (no weights: instant even for Mixtral-8x7B), router options on a
dense model, the `sft:`/`dpo:` pass-through keys against trl.SFTConfig/DPOConfig (names, value
types read from TRL's dataclass, ranges training would reject, then the config itself is
built, which costs milliseconds), settings that cannot run here (fp16 without a GPU), eval
settings without eval data, and an eval split that leaves less than one batch of training rows
(counted cheaply in local files). All problems are collected and raised together.

    finetune validate recipes/mixtral-8x7b/sft.yaml
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import modeling, runs
from finetune.data import LOCAL_SUFFIXES, count_rows
from finetune.errors import Problem, UserError, did_you_mean
from finetune.lora import Plan, plan_targets
from finetune.recipe import BOOL_HINT, YAML11_BOOLS, Recipe

# Trainer-config keys that a recipe sets elsewhere, so there is one place for each setting.
OWNED_KEYS = {
    "output_dir": "output_dir",
    "max_length": "data.max_length",
    "assistant_only_loss": "data.assistant_only_loss",
    "router_aux_loss_coef": "router.aux_loss_coef",
    "seed": "seed",
    "model_init_kwargs": "model",
    "chat_template_path": "model.chat_template",
}


@dataclass
class Checked:
    """What validation resolved, so a stage need not redo it."""

    recipe: Recipe
    stage: str
    config: object
    plan: Plan
    moe: bool


def stage_of(recipe: Recipe) -> str:
    return "dpo" if recipe.from_run or recipe.dpo else "sft"


def _check_stage_sections(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    if stage == "sft":
        if recipe.dpo:
            problems.append(Problem("dpo", "an SFT recipe has an `sft:` section, not `dpo:` (use `finetune dpo` for DPO)"))
        if recipe.from_run:
            problems.append(Problem("from_run", "only DPO recipes start from a run; `finetune sft` starts from model.name_or_path"))
        if not recipe.model.name_or_path:
            problems.append(Problem("model.name_or_path", "required: a local model directory or a hub id"))
    else:
        if recipe.sft:
            problems.append(Problem("sft", "a DPO recipe has a `dpo:` section, not `sft:`"))
        if not recipe.from_run:
            problems.append(Problem("from_run", "required: the SFT run directory this DPO stage starts from"))
    if not recipe.output_dir:
        problems.append(Problem("output_dir", "required: where the run writes its adapter and metrics"))
    if not recipe.data.train:
        problems.append(Problem("data.train", "required: at least one training file or hub data set"))
    for key in ("train", "eval"):
        for i, source in enumerate(getattr(recipe.data, key)):
            if Path(source).suffix in LOCAL_SUFFIXES and not Path(source).is_file():
                problems.append(Problem(f"data.{key}[{i}]", f"file not found: {source} (relative to {Path.cwd()})"))
    template = recipe.model.chat_template
    if template and template.endswith(".jinja") and not Path(template).is_file():
        problems.append(Problem("model.chat_template", f"file not found: {template}"))


# Pass-through values TRL accepts but training rejects later, or trains on silently: a DPO beta
# <= 0 learns nothing or the reverse preference; 0 epochs (without max_steps) trains no step.
POSITIVE = ("learning_rate", "beta", "num_train_epochs")
AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def _simple_types(tp) -> set | None:
    """{bool, int, float, str} (and None) a TRL field takes, or None for a type we do not check."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    out = set()
    for a in args:
        if a is type(None) or a in (bool, int, float, str):
            out.add(a)
        elif isinstance(a, type) and issubclass(a, enum.Enum):
            out.add(str)  # IntervalStrategy etc. take their string values
        else:
            return None
    return out


def _value_problem(value, allowed: set) -> str | None:
    if value is None:
        return None if type(None) in allowed else "must not be null"
    kind = type(value)
    if kind in allowed or (kind is int and float in allowed):
        if kind is float and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        return None
    if kind is str and allowed & {int, float}:
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            return f"must be a finite number, got {value!r}"
    names = " or ".join(sorted(t.__name__.replace("NoneType", "null") for t in allowed))
    hint = BOOL_HINT if bool in allowed and kind is str and value.lower() in YAML11_BOOLS else ""
    return f"expected {names}, got {value!r}{hint}"


@functools.cache
def _trl_fields(stage: str):
    """(config class, field types) of trl.SFTConfig/DPOConfig; resolving ~140 annotations costs ~10 ms."""
    from trl import DPOConfig, SFTConfig

    cls = SFTConfig if stage == "sft" else DPOConfig
    return cls, typing.get_type_hints(cls)


def _check_passthrough(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    cls, hints = _trl_fields(stage)
    fields = {f.name for f in dataclasses.fields(cls)}
    section = getattr(recipe, stage)
    if not isinstance(section, dict):
        return  # reported by recipe.py
    for key, value in section.items():
        where = f"{stage}.{key}"
        if key in OWNED_KEYS:
            problems.append(Problem(where, f"set `{OWNED_KEYS[key]}` in the recipe instead"))
        elif key not in fields:
            problems.append(Problem(where, f"not a trl.{cls.__name__} field" + did_you_mean(key, fields)))
        elif (allowed := _simple_types(hints[key])) and (what := _value_problem(value, allowed)):
            if not any(p.where == where for p in problems):  # non-finite numbers are reported already
                problems.append(Problem(where, what))
        elif key in POSITIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0 and not (
            key == "num_train_epochs" and isinstance(section.get("max_steps"), int) and section["max_steps"] > 0
        ):
            problems.append(Problem(where, f"must be > 0, got {value}"))
        elif key in AT_LEAST_ONE and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(Problem(where, f"must be at least 1, got {value}"))
    for key in ("fp16", "bf16"):
        if section.get(key) is True and not torch.cuda.is_available():
            # trainer_args turns mixed precision off without a GPU, so the run would record
            # fp16 and train in float32; refuse rather than record what did not happen
            problems.append(Problem(f"{stage}.{key}", "mixed precision needs a GPU and this machine has none "
                                    "(training would run in float32); remove it, or run on a GPU"))


def _has_eval_data(recipe: Recipe) -> bool:
    split = recipe.data.eval_split
    return bool(recipe.data.eval) or (isinstance(split, (int, float)) and split > 0)


def _check_eval_and_split(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    """Eval settings need eval data; a split must leave one batch of training rows (local files only)."""
    from finetune.stages.common import STAGE_DEFAULTS

    section = getattr(recipe, stage)
    strategy = section.get("eval_strategy", "no")
    if strategy in ("steps", "epoch") and not _has_eval_data(recipe):
        problems.append(Problem(f"{stage}.eval_strategy", f"`{strategy}` needs eval data: set data.eval or "
                                "data.eval_split, or remove eval_strategy"))
    split = recipe.data.eval_split
    if recipe.data.eval or not isinstance(split, float) or not 0 < split < 1:
        return
    counts = [count_rows(s) for s in recipe.data.train]
    if None in counts:
        return  # a hub data set, or a file the data reader will report
    batch = section.get("per_device_train_batch_size", STAGE_DEFAULTS[stage]["per_device_train_batch_size"])
    rows = sum(counts)
    held_out = math.ceil(split * rows)  # what datasets' train_test_split holds out
    if isinstance(batch, int) and rows - held_out < max(batch, 1):
        problems.append(Problem("data.eval_split", f"{split} of the {rows} training rows leaves {rows - held_out} to "
                                f"train on, less than one batch ({stage}.per_device_train_batch_size={batch}); "
                                "lower eval_split, add rows, or give data.eval"))


def _check_trainer_config(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    """Build the TRL config the stage will build, so its own checks (choices, step settings) run now."""
    from finetune.stages.common import trainer_args

    aux = recipe.router.aux_loss_coef if isinstance(recipe.router.aux_loss_coef, float) else 0.0
    try:  # the output path is only recorded in the config; nothing is created
        trainer_args(recipe, stage, Path(recipe.output_dir or "unset"), aux, _has_eval_data(recipe))
    except UserError as exc:
        problems.extend(exc.problems)


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


def check(recipe: Recipe, stage: str | None = None) -> Checked:
    """Every problem with the recipe, raised at once as a UserError; else what was resolved."""
    stage = stage or stage_of(recipe)
    problems: list[Problem] = list(recipe.problems)
    _check_stage_sections(recipe, stage, problems)
    _check_passthrough(recipe, stage, problems)
    passthrough_ok = not any(p.where.split(".")[0] == stage for p in problems)
    if passthrough_ok and isinstance(recipe.data.eval, list):
        _check_eval_and_split(recipe, stage, problems)
    # the config takes the seed, max_length and the pass-through section: build it only when they are well-typed
    if passthrough_ok and not any(p.where.split(".")[0] in (stage, "seed", "data") for p in problems):
        _check_trainer_config(recipe, stage, problems)
    own_model = recipe.model
    if stage == "dpo" and recipe.from_run:
        recipe = inherit_from_parent(recipe, problems)
    if not any(p.where == "model.quantization" for p in recipe.problems):
        from finetune.qlora import recipe_problems  # QLoRA's own checks (4-bit base, finetune/qlora/__init__.py)

        problems.extend(recipe_problems(recipe, own_model if stage == "dpo" else None))
    config, plan, moe = None, Plan(), False
    if recipe.model.name_or_path:
        try:
            config = modeling.load_config(recipe.model)
        except UserError as exc:
            problems.extend(exc.problems)
    # Matching targets needs well-typed model/lora/router sections; their type errors are reported already.
    typed = not any(p.where.split(".")[0].split("[")[0] in ("model", "lora", "router") for p in recipe.problems)
    if config is not None and typed:
        moe = modeling.is_moe(config)
        try:
            model = modeling.meta_model(config, recipe.model.trust_remote_code)
        except UserError as exc:
            problems.extend(exc.problems)
        else:
            plan, target_problems = plan_targets(recipe.lora, recipe.router, model, moe)
            problems.extend(target_problems)
            from finetune.qlora.chain import parameter_target_problems  # 4-bit DPO stacks adapters

            problems.extend(parameter_target_problems(recipe, plan, model, moe))
    if problems:
        raise UserError(problems, title=f"{recipe.source or 'recipe'}: {len(problems)} problem(s)")
    return Checked(recipe=recipe, stage=stage, config=config, plan=plan, moe=moe)
