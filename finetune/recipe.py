"""Recipes: the typed schema, YAML loading, `--set` overrides, and the structural checks.

A recipe is one YAML file per stage (recipes/<model>/sft.yaml, recipes/<model>/dpo.yaml). This
module turns it into a `Recipe` and collects every structural problem (unknown key with a
did-you-mean, wrong type, bad choice) with its dotted key path. Checks that need the model or
the disk (files exist, LoRA targets match) live in finetune/validate.py.

    finetune validate recipes/tiny-moe/sft.yaml
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune.errors import Problem, UserError, did_you_mean

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["gate_up_proj", "down_proj"]
DENSE_MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]
# Mixtral's original checkpoints name the expert matrices w1 (gate), w3 (up) and w2 (down);
# transformers 5 fuses w1 and w3 into one gate_up_proj, so both aliases reach the same parameter.
EXPERT_ALIASES = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


@dataclass
class ModelSection:
    name_or_path: str = ""
    """Local directory or hub id of the base model."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2, ..."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the repository."""
    chat_template: str | None = None
    """Path to a .jinja file, or the template itself; default: the tokenizer's own."""
    quantization: str = "none"
    """none, or nf4: QLoRA, base weights in 4-bit NF4 (bitsandbytes) including the fused experts (finetune/qlora/__init__.py)."""


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)
    """Training files (.jsonl, .json, .parquet) or hub data set names (name or name:split)."""
    eval: list[str] = field(default_factory=list)
    """Evaluation files or hub names; empty: take `eval_split` of train, or no eval."""
    eval_split: float = 0.0
    """Fraction of the training rows held out for evaluation when `eval` is empty."""
    max_length: int = 1024
    """Longest row in tokens; longer rows are an error (or dropped, see bad_rows)."""
    bad_rows: str = "error"
    """error: stop at the first bad row, naming file and row; drop: skip bad rows and report the count."""
    assistant_only_loss: bool = True
    """SFT: loss on assistant tokens only (the usual choice); false trains on the whole conversation."""


@dataclass
class LoraGroup:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r."""
    targets: list[str] = field(default_factory=list)
    """Module or parameter names in this group; empty: the group's defaults."""


@dataclass
class LoraSection:
    attention: LoraGroup | None = None
    """Attention projections q/k/v/o_proj. Absent: on, rank 16; false: off."""
    experts: LoraGroup | None = None
    """MoE expert weights gate_up_proj/down_proj (aliases w1/w3/w2). Absent: on for MoE models; false: off."""
    mlp: LoraGroup | None = None
    """Dense MLP gate/up/down_proj (Mistral-style models). Absent: on for dense models; false: off."""
    dropout: float = 0.0
    """LoRA dropout on every group."""
    expert_path: str = "fast"
    """fast: expert LoRA applied to activations (finetune/expert_lora.py); peft: PEFT's stock path."""


@dataclass
class RouterSection:
    policy: str = "freeze"
    """freeze: router weights untouched; train: trained in full and saved with the adapter; lora: a LoRA on the router."""
    aux_loss_coef: float | None = None
    """Load-balancing loss coefficient, applied the same in every stage; absent: the model config's value."""
    lora: LoraGroup | None = None
    """Rank and alpha for policy `lora` (default r=8, alpha=16)."""


@dataclass
class Recipe:
    output_dir: str = ""
    """Where the run writes adapter, tokenizer, resolved recipe and metrics."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    router: RouterSection = field(default_factory=RouterSection)
    from_run: str | None = None
    """DPO: the SFT run directory this stage starts from (base model and tokenizer come from it)."""
    seed: int = 42
    """Seed for data shuffling and LoRA initialisation."""
    sft: dict = field(default_factory=dict)
    """Passed to trl.SFTConfig (learning_rate, num_train_epochs, per_device_train_batch_size, ...)."""
    dpo: dict = field(default_factory=dict)
    """Passed to trl.DPOConfig (beta, loss_type, precompute_ref_log_probs, ...)."""

    # Not part of the YAML: where the recipe came from, and its structural problems, which
    # finetune/validate.py reports together with everything else it finds.
    source: str = field(default="", metadata={"internal": True})
    problems: list = field(default_factory=list, metadata={"internal": True})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _check_value(value, tp, where: str, problems: list[Problem]):
    """Check `value` against the annotation `tp`; returns the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(value, args[0], where, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a mapping of {tp.__name__} keys, got {value!r}"))
            return tp()
        return _build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]  # a single file is the common case; accept it without list syntax
        if not isinstance(value, list):
            problems.append(Problem(where, f"expected a list, got {value!r}"))
            return []
        return [_check_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(Problem(where, f"expected a mapping, got {value!r}"))
            return {}
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


def _build(cls, raw: dict, prefix: str, problems: list[Problem]):
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


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style floats and booleans (PyYAML implements YAML 1.1).

    Floats: YAML 1.1 reads `1e-4` as a string, which nobody means.
    Booleans: YAML 1.1 also reads yes/no/on/off (any case) as booleans, so `eval_strategy: no`
    (a real TRL value) arrived as False and failed. We read only true/false as booleans, as
    YAML 1.2, JSON and most other tools do: a string field gets exactly what was written, and a
    boolean field given `yes` is an error that says to write true/false. Guessing a boolean
    where the field wants a string (or the reverse) would be silently wrong somewhere.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"""
               r"""|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"""),
    list("-+0123456789."),
)


# Words YAML 1.1 reads as booleans; our loader keeps them strings (see _Loader).
YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}
BOOL_HINT = " (write true or false; yes/no/on/off are read as strings)"


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


CHOICES = {
    "model.dtype": ["auto", "float32", "bfloat16", "float16"],
    "model.quantization": ["none", "nf4"],
    "data.bad_rows": ["error", "drop"],
    "lora.expert_path": ["fast", "peft"],
    "router.policy": ["freeze", "train", "lora"],
}


def _check_choices(recipe: Recipe, problems: list[Problem]) -> None:
    for path, choices in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(recipe, section), key)
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
    groups = {f"lora.{name}": getattr(recipe.lora, name) for name in ("attention", "experts", "mlp")}
    groups["router.lora"] = recipe.router.lora
    for where, group in groups.items():
        if isinstance(group, LoraGroup) and bad(group.r, lambda v: v >= 1):
            problems.append(Problem(f"{where}.r", f"rank must be at least 1, got {group.r}"))
    if bad(recipe.seed, lambda v: 0 <= v < 2**32):  # numpy's seed range; set_seed fails outside it
        problems.append(Problem("seed", f"must be in [0, 2**32), got {recipe.seed}"))
    if bad(recipe.router.aux_loss_coef, lambda v: v >= 0):
        problems.append(Problem("router.aux_loss_coef", "must be >= 0"))


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Apply `--set a.b.c=value` (value parsed as YAML) to the raw mapping in place."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or "" in key.split("."):
            problems.append(Problem(f"--set {item}", "expected key.path=value, e.g. --set sft.learning_rate=1e-4"))
            continue
        try:
            value = load_yaml(text)
        except yaml.YAMLError as exc:
            # Taking broken YAML as a plain string once made `data.train=[x.jsonl, ` a file name.
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(Problem(f"--set {item}", f"the value is not valid YAML ({reason}); "
                                    f"quote a string value: --set '{key}=\"...\"'"))
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(f"--set {key}", f"`{part}` is not a mapping in this recipe"))
                break
        else:
            node[parts[-1]] = value
    return problems


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
    recipe = _build(Recipe, raw, "", problems)
    _check_choices(recipe, problems)
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


def write_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
