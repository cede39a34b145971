"""The `sft:`/`dpo:` pass-through sections, checked against trl.SFTConfig/DPOConfig before training.

Names, value types read from TRL's dataclass, ranges training would reject, keys a recipe sets
elsewhere, settings that cannot run here (fp16 without a GPU), eval settings without eval data,
an eval split that leaves less than one batch (counted cheaply in local files), and finally the
config itself is built (milliseconds), so TRL's own checks run now.

    finetune validate recipes/tiny-moe/sft.yaml
Layer: validate; imports train.args (sibling), data, recipe, errors.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from pathlib import Path

import torch

from finetune.data.sources import count_rows
from finetune.errors import Problem, UserError, did_you_mean
from finetune.recipe import BOOL_HINT, YAML11_BOOLS, Recipe
from finetune.train.args import STAGE_DEFAULTS, trainer_args

# Trainer-config keys that a recipe sets elsewhere, so there is one place for each setting.
OWNED_KEYS = {
    "output_dir": "output_dir",
    "max_length": "data.max_length",
    # data.too_long: truncate counts the rows TRL's keep_start would drop (finetune/data/convert.py)
    "truncation_mode": "data.too_long",
    "assistant_only_loss": "data.assistant_only_loss",
    "router_aux_loss_coef": "router.aux_loss_coef",
    "seed": "seed",
    "model_init_kwargs": "model",
    "chat_template_path": "model.chat_template",
}


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
    from trl import (  # trl imported here: `finetune --help` needs no trl
        DPOConfig,
        SFTConfig,
    )

    cls = SFTConfig if stage == "sft" else DPOConfig
    return cls, typing.get_type_hints(cls)


def check_passthrough(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
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


def has_eval_data(recipe: Recipe) -> bool:
    split = recipe.data.eval_split
    return bool(recipe.data.eval) or (isinstance(split, (int, float)) and split > 0)


def check_eval_and_split(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    """Eval settings need eval data; a split must leave one batch of training rows (local files only)."""
    section = getattr(recipe, stage)
    strategy = section.get("eval_strategy", "no")
    if strategy in ("steps", "epoch") and not has_eval_data(recipe):
        problems.append(Problem(f"{stage}.eval_strategy", f"`{strategy}` needs eval data: set data.eval or "
                                "data.eval_split, or remove eval_strategy"))
    split = recipe.data.eval_split
    if recipe.data.eval or not isinstance(split, float) or not 0 < split < 1:
        return
    # a source with `samples` gives exactly that many rows (finetune/data/mixture.py)
    counts = [s.samples if isinstance(getattr(s, "samples", None), int) else count_rows(s) for s in recipe.data.train]
    if None in counts:
        return  # a hub data set, or a file the data reader will report
    batch = section.get("per_device_train_batch_size", STAGE_DEFAULTS[stage]["per_device_train_batch_size"])
    rows = sum(counts)
    held_out = math.ceil(split * rows)  # what datasets' train_test_split holds out
    if isinstance(batch, int) and rows - held_out < max(batch, 1):
        problems.append(Problem("data.eval_split", f"{split} of the {rows} training rows leaves {rows - held_out} to "
                                f"train on, less than one batch ({stage}.per_device_train_batch_size={batch}); "
                                "lower eval_split, add rows, or give data.eval"))


def check_trainer_config(recipe: Recipe, stage: str, problems: list[Problem]) -> None:
    """Build the TRL config the stage will build, so its own checks (choices, step settings) run now."""
    aux = recipe.router.aux_loss_coef if isinstance(recipe.router.aux_loss_coef, float) else 0.0
    try:  # the output path is only recorded in the config; nothing is created
        trainer_args(recipe, stage, Path(recipe.output_dir or "unset"), aux, has_eval_data(recipe))
    except UserError as exc:
        problems.extend(exc.problems)
