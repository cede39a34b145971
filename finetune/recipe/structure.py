"""Structural checks of a recipe: every key known (with a did-you-mean), every value of its type and range.

    finetune validate recipes/tiny-moe/sft.yaml
Layer: recipe.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from finetune.errors import Problem, did_you_mean
from finetune.recipe.schema import LoraGroup, Recipe
from finetune.recipe.yaml_io import BOOL_HINT, YAML11_BOOLS


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _check_value(value, tp, where: str, problems: list[Problem]):
    """Check `value` against the annotation `tp`; returns the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if classes and len(args) > 1:  # `str | DataSource`: a mapping is the dataclass, anything else the rest
            if isinstance(value, dict):
                return _check_value(value, classes[0], where, problems)
            rest = [a for a in args if a not in classes]
            if any(type(value) is a for a in rest):
                return value
            names = " or ".join([*(_type_name(a) for a in rest), f"a mapping of {classes[0].__name__} keys"])
            problems.append(Problem(where, f"expected {names}, got {value!r}"))
            return value
        simple = [a for a in args if a in (int, float, str, bool)]
        if len(simple) > 1 and len(simple) == len(args):  # `int | str`: the value's own type, if listed
            if any(type(value) is a for a in simple):
                return value
            names = " or ".join(_type_name(a) for a in simple)
            problems.append(Problem(where, f"expected {names}, got {value!r}"))
            return value
        return _check_value(value, args[0], where, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a mapping of {tp.__name__} keys, got {value!r}"))
            return tp()
        return build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) or (isinstance(value, dict) and _has_dataclass(item_tp)):
            value = [value]  # a single file (or source mapping) is the common case; accept it without list syntax
        if not isinstance(value, list):
            problems.append(Problem(where, f"expected a list, got {value!r}"))
            return []
        return [_check_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a mapping, got {value!r}"))
            return {}
        if origin is dict:  # `dict[str, str]` (a source's columns): every value checked, named by its key
            _, value_tp = typing.get_args(tp)
            return {k: _check_value(v, value_tp, f"{where}.{k}", problems) for k, v in value.items()}
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 as a string; accept it as the number everyone means
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # a NaN alpha once "trained" a run with loss 0.0 and NaN aux loss, and marked it finished
        problems.append(Problem(where, f"must be a finite number, got {value}"))
        return value
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        hint = BOOL_HINT if tp is bool and isinstance(value, str) and value.lower() in YAML11_BOOLS else ""
        problems.append(Problem(where, f"expected {_type_name(tp)}, got {value!r}{hint}"))
        return value
    return value


def _has_dataclass(tp) -> bool:
    return any(dataclasses.is_dataclass(a) for a in (typing.get_args(tp) or (tp,)))


def build(cls, raw: dict, prefix: str, problems: list[Problem]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            problems.append(Problem(where, "unknown key" + did_you_mean(str(key), fields)))
            continue
        tp = hints[key]
        if value is False and typing.get_origin(tp) in (typing.Union, types.UnionType) and any(
            dataclasses.is_dataclass(a) for a in typing.get_args(tp)
        ):
            kwargs[key] = False  # `group: false` switches a LoRA group off
            continue
        kwargs[key] = _check_value(value, tp, where, problems)
    return cls(**kwargs)

CHOICES = {
    "model.dtype": ["auto", "float32", "bfloat16", "float16"],
    "model.quantization": ["none", "nf4"],
    "data.bad_rows": ["error", "drop"],
    "data.system": ["auto", "keep", "fold", "drop"],
    "data.too_long": ["error", "drop", "truncate"],
    "lora.expert_path": ["fast", "peft"],
    "router.policy": ["freeze", "train", "lora"],
    "early_stopping.mode": ["auto", "min", "max"],
}


def check_choices(recipe: Recipe, problems: list[Problem]) -> None:
    for path, choices in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(recipe, section), key, None)  # an absent optional section has no values
        if isinstance(value, str) and value not in choices:
            problems.append(
                Problem(path, f"`{value}` is not one of {', '.join(choices)}" + did_you_mean(value, choices))
            )
    # Range checks only on values of the right type; a wrong type is already a problem.
    def bad(value, ok) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value)

    if bad(recipe.data.eval_split, lambda v: 0.0 <= v < 1.0):
        problems.append(Problem("data.eval_split", "must be in [0, 1)"))
    if bad(recipe.data.max_length, lambda v: v >= 8):
        problems.append(Problem("data.max_length", "must be at least 8 tokens"))
    if bad(recipe.lora.dropout, lambda v: 0.0 <= v < 1.0):
        problems.append(Problem("lora.dropout", "must be in [0, 1)"))
    groups = {f"lora.{name}": getattr(recipe.lora, name) for name in ("attention", "experts", "shared_experts", "mlp")}
    groups["router.lora"] = recipe.router.lora
    for where, group in groups.items():
        if isinstance(group, LoraGroup) and bad(group.r, lambda v: v >= 1):
            problems.append(Problem(f"{where}.r", f"rank must be at least 1, got {group.r}"))
    if bad(recipe.seed, lambda v: 0 <= v < 2**32):  # numpy's seed range; set_seed fails outside it
        problems.append(Problem("seed", f"must be in [0, 2**32), got {recipe.seed}"))
    if bad(recipe.router.aux_loss_coef, lambda v: v >= 0):
        problems.append(Problem("router.aux_loss_coef", "must be >= 0"))
    samples, stopping = recipe.samples, recipe.early_stopping
    if samples is not None:
        for key in ("every", "max_new_tokens"):
            if bad(getattr(samples, key), lambda v: v >= 1):
                problems.append(Problem(f"samples.{key}", f"must be at least 1, got {getattr(samples, key)}"))
        if bad(samples.prompts, lambda v: v >= 1) and not isinstance(samples.prompts, str):
            problems.append(Problem("samples.prompts", f"a count must be at least 1, got {samples.prompts}"))
    if stopping is not None:
        if bad(stopping.patience, lambda v: v >= 1):
            problems.append(Problem("early_stopping.patience", f"must be at least 1, got {stopping.patience}"))
        if bad(stopping.threshold, lambda v: v >= 0):
            problems.append(Problem("early_stopping.threshold", f"must be >= 0, got {stopping.threshold}"))
