"""LoRA targets and router policy: from a recipe's `lora:`/`router:` sections to a peft.LoraConfig.

Targets are grouped (attention, experts, dense mlp, router). Expert weights in transformers 5
are fused 3-D parameters that only PEFT's `target_parameters` reaches; an expert target that
matches nothing would silently train attention only, so matching is checked against the model's
module tree (on the meta device for `finetune validate`) and again after PEFT has wrapped it.
Routers are found by finetune/moe.py's one rule.

    finetune validate recipes/mixtral-8x7b/sft.yaml     # prints the resolved targets per group
Layer: lora; imports moe, recipe, errors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from finetune.errors import Problem, did_you_mean
from finetune.moe import find_routers
from finetune.recipe import ATTENTION_TARGETS, DENSE_MLP_TARGETS, EXPERT_ALIASES, EXPERT_TARGETS, LoraGroup, LoraSection, RouterSection

GROUP_DEFAULT_TARGETS = {"attention": ATTENTION_TARGETS, "experts": EXPERT_TARGETS, "mlp": DENSE_MLP_TARGETS}
ROUTER_LORA_DEFAULT = LoraGroup(r=8, alpha=16.0)


@dataclass
class Targets:
    """What will be adapted: per group, its rank/alpha and the resolved target names."""

    groups: dict[str, LoraGroup] = field(default_factory=dict)
    router_modules: list[str] = field(default_factory=list)
    """Suffixes of router modules, e.g. `mlp.gate` (relative to a decoder layer)."""
    router_policy: str = "freeze"
    router_lora: LoraGroup | None = None
    dropout: float = 0.0


def resolve_targets(section: LoraSection, router: RouterSection, model: nn.Module, moe: bool) -> tuple[Targets, list[Problem]]:
    """Resolve groups against the model's module tree; every unmatched target is a problem."""
    problems: list[Problem] = []
    resolved = Targets(router_policy=router.policy, dropout=section.dropout)
    module_names = [n for n, _ in model.named_modules()]
    param_names = [n for n, _ in model.named_parameters()]

    for group_name, defaults in GROUP_DEFAULT_TARGETS.items():
        group = getattr(section, group_name)
        if group is False:
            continue
        default_on = group_name == "attention" or (group_name == "experts") == moe
        if group is None:
            if not default_on:
                continue
            group = LoraGroup()
        if group_name == "experts" and not moe:
            problems.append(Problem("lora.experts", "the model is dense (no MoE experts); use lora.mlp for its MLP"))
            continue
        if group_name == "mlp" and moe:
            problems.append(Problem("lora.mlp", "the model is a Mixture-of-Experts; its MLPs are lora.experts"))
            continue
        names = []
        for t in group.targets or defaults:
            t = EXPERT_ALIASES.get(t, t) if group_name == "experts" else t
            if t not in names:
                names.append(t)
        for t in names:
            if group_name == "experts":
                hits = [n for n in param_names if n.endswith(f".experts.{t}")]
            else:
                hits = [n for n in module_names if n.endswith(f".{t}")]
            if not hits:
                where = f"lora.{group_name}.targets"
                known = sorted({n.rsplit(".", 1)[-1] for n in (param_names if group_name == "experts" else module_names)})
                problems.append(
                    Problem(where, f"`{t}` matches nothing in the model" + did_you_mean(t, known)
                            + (" — expert LoRA would silently train attention only" if group_name == "experts" else ""))
                )
        resolved.groups[group_name] = LoraGroup(r=group.r, alpha=group.alpha, targets=names)

    routers = find_routers(model)
    if router.policy != "freeze" or router.aux_loss_coef:
        if not moe or not routers:
            key = "router.policy" if router.policy != "freeze" else "router.aux_loss_coef"
            problems.append(Problem(key, "the model has no MoE router (dense model); remove the router section"))
    resolved.router_modules = sorted({r.suffix for r in routers})
    if router.policy == "lora":
        resolved.router_lora = router.lora or ROUTER_LORA_DEFAULT
    elif router.lora is not None:
        problems.append(Problem("router.lora", "only used with router.policy: lora"))
    # PEFT's ParamWrapper (target_parameters: the fused experts, the router LoRA) raises on any
    # lora_dropout != 0, but only when the model is wrapped, after the weights are loaded.
    uses_parameters = "experts" in resolved.groups or resolved.router_policy == "lora"
    if isinstance(section.dropout, (int, float)) and section.dropout and uses_parameters:
        problems.append(Problem("lora.dropout", f"{section.dropout} is not supported with expert or router LoRA "
                                "(PEFT's target_parameters LoRA has no dropout); set lora.dropout: 0"))
    if not resolved.groups and router.policy == "freeze":
        problems.append(Problem("lora", "every LoRA group is off and the router is frozen: nothing would train"))
    return resolved, problems


def lora_config(targets: Targets) -> LoraConfig:
    """The peft.LoraConfig for resolved targets: modules for attention/mlp, parameters for experts/router."""
    target_modules, target_parameters = [], []
    rank_pattern, alpha_pattern = {}, {}
    for group_name, group in targets.groups.items():
        for t in group.targets:
            if group_name == "experts":
                # PEFT matches target_parameters by suffix; keep the `experts.` prefix so a dense
                # `down_proj` elsewhere can never be taken for the fused expert parameter.
                target_parameters.append(f"experts.{t}")
            else:
                target_modules.append(t)
            rank_pattern[t] = group.r
            alpha_pattern[t] = group.alpha
    modules_to_save = None
    if targets.router_policy == "train":
        # The router is small (E x H per layer): train it in full. PEFT saves a trainable copy in
        # the adapter file and merge_and_unload puts it back in place, which is what export needs.
        modules_to_save = list(targets.router_modules)
    elif targets.router_policy == "lora":
        for suffix in targets.router_modules:
            target_parameters.append(f"{suffix}.weight")
            rank_pattern[f"{suffix}.weight"] = targets.router_lora.r
            alpha_pattern[f"{suffix}.weight"] = targets.router_lora.alpha
    first = next(iter(targets.groups.values()), targets.router_lora or ROUTER_LORA_DEFAULT)
    return LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=targets.dropout,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )


def parameter_group(name: str) -> str:
    """Which recipe group a (PEFT-wrapped) parameter name belongs to."""
    if ".experts." in name or name.endswith(".experts"):
        return "experts"
    if ".gate." in name and ".mlp." in name or "modules_to_save" in name or ".gate.weight" in name:
        return "router"
    if "self_attn" in name or "attention" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def trainable_by_group(model: nn.Module) -> dict[str, int]:
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[parameter_group(name)] += p.numel()
    return dict(counts)


def check_wrapped(model: nn.Module, targets: Targets) -> None:
    """After PEFT wrapped the model: every targeted group trains, in every layer that has it.

    Raises RuntimeError (an internal bug, not bad input: the targets already matched) rather than
    letting a run go on that trains attention only.
    """
    if "experts" in targets.groups:
        wanted = set(targets.groups["experts"].targets)
        per_module: dict[str, set] = {}
        for name, module in model.named_modules():
            if isinstance(module, ParamWrapper) and ".experts" in name:
                key = name.split(".experts")[0]
                per_module.setdefault(key, set()).add(module.parameter_name)
        layers = {n.split(".experts")[0] for n, _ in model.named_parameters() if ".experts." in n}
        missing = [layer for layer in sorted(layers) if not wanted <= per_module.get(layer, set())]
        if missing or not layers:
            raise RuntimeError(f"expert LoRA missing in {missing or 'every layer'}; refusing to train attention only")
    counts = trainable_by_group(model)
    for group in targets.groups:
        if not counts.get(group):
            raise RuntimeError(f"LoRA group `{group}` has no trainable parameters after wrapping")
    if targets.router_policy != "freeze" and not counts.get("router"):
        raise RuntimeError(f"router policy `{targets.router_policy}` but no router parameter is trainable")
