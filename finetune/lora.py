"""LoRA targets and router policy: from a recipe's `lora:`/`router:` sections to a peft.LoraConfig.

Targets are grouped (attention, experts, dense mlp, router). Expert weights in transformers 5
are fused 3-D parameters that only PEFT's `target_parameters` reaches; an expert target that
matches nothing would silently train attention only, so matching is checked against the model's
module tree (on the meta device for `finetune validate`) and again after PEFT has wrapped it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from peft import LoraConfig
from torch import nn

from finetune.errors import Problem, did_you_mean
from finetune.recipe import (
    ATTENTION_TARGETS,
    DENSE_MLP_TARGETS,
    EXPERT_ALIASES,
    EXPERT_TARGETS,
    LoraGroup,
    LoraSection,
    RouterSection,
)

GROUP_DEFAULT_TARGETS = {"attention": ATTENTION_TARGETS, "experts": EXPERT_TARGETS, "mlp": DENSE_MLP_TARGETS}
ROUTER_LORA_DEFAULT = LoraGroup(r=8, alpha=16.0)


@dataclass
class Plan:
    """What will be adapted: per group, its rank/alpha and the resolved target names."""

    groups: dict[str, LoraGroup] = field(default_factory=dict)
    router_modules: list[str] = field(default_factory=list)
    """Suffixes of router modules, e.g. `mlp.gate` (relative to a decoder layer)."""
    router_policy: str = "freeze"
    router_lora: LoraGroup | None = None
    dropout: float = 0.0


def find_routers(model: nn.Module) -> dict[str, nn.Module]:
    """Router modules by full name: a `gate` whose parent MoE block also holds `experts`."""
    routers = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        gate = getattr(module, "gate", None)
        if experts is not None and isinstance(gate, nn.Module) and hasattr(gate, "weight"):
            routers[f"{name}.gate" if name else "gate"] = gate
    return routers


def _suffix_after_layer(name: str) -> str:
    """`model.layers.3.mlp.gate` -> `mlp.gate`: the per-layer path PEFT matches on."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return name


def plan_targets(section: LoraSection, router: RouterSection, model: nn.Module, moe: bool) -> tuple[Plan, list[Problem]]:
    """Resolve groups against the model's module tree; every unmatched target is a problem."""
    problems: list[Problem] = []
    plan = Plan(router_policy=router.policy, dropout=section.dropout)
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
        targets = []
        for t in group.targets or defaults:
            t = EXPERT_ALIASES.get(t, t) if group_name == "experts" else t
            if t not in targets:
                targets.append(t)
        for i, t in enumerate(targets):
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
        plan.groups[group_name] = LoraGroup(r=group.r, alpha=group.alpha, targets=targets)

    routers = find_routers(model)
    if router.policy != "freeze" or router.aux_loss_coef:
        if not moe or not routers:
            key = "router.policy" if router.policy != "freeze" else "router.aux_loss_coef"
            problems.append(Problem(key, "the model has no MoE router (dense model); remove the router section"))
    plan.router_modules = sorted({_suffix_after_layer(n) for n in routers})
    if router.policy == "lora":
        plan.router_lora = router.lora or ROUTER_LORA_DEFAULT
    elif router.lora is not None:
        problems.append(Problem("router.lora", "only used with router.policy: lora"))
    # PEFT's ParamWrapper (target_parameters: the fused experts, the router LoRA) raises on any
    # lora_dropout != 0, but only when the model is wrapped, after the weights are loaded.
    uses_parameters = "experts" in plan.groups or plan.router_policy == "lora"
    if isinstance(section.dropout, (int, float)) and section.dropout and uses_parameters:
        problems.append(Problem("lora.dropout", f"{section.dropout} is not supported with expert or router LoRA "
                                "(PEFT's target_parameters LoRA has no dropout); set lora.dropout: 0"))
    if not plan.groups and router.policy == "freeze":
        problems.append(Problem("lora", "every LoRA group is off and the router is frozen: nothing would train"))
    return plan, problems


def lora_config(plan: Plan) -> LoraConfig:
    """The peft.LoraConfig for a plan: modules for attention/mlp, parameters for experts/router."""
    target_modules, target_parameters = [], []
    rank_pattern, alpha_pattern = {}, {}
    for group_name, group in plan.groups.items():
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
    if plan.router_policy == "train":
        # The router is small (E x H per layer): train it in full. PEFT saves a trainable copy in
        # the adapter file and merge_and_unload puts it back in place, which is what export needs.
        modules_to_save = list(plan.router_modules)
    elif plan.router_policy == "lora":
        for suffix in plan.router_modules:
            target_parameters.append(f"{suffix}.weight")
            rank_pattern[f"{suffix}.weight"] = plan.router_lora.r
            alpha_pattern[f"{suffix}.weight"] = plan.router_lora.alpha
    first = next(iter(plan.groups.values()), plan.router_lora or ROUTER_LORA_DEFAULT)
    return LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=plan.dropout,
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


def verify_adapters(model: nn.Module, plan: Plan) -> None:
    """After PEFT wrapped the model: every planned group trains, in every layer that has it.

    Raises RuntimeError (an internal bug, not bad input: the plan already matched) rather than
    letting a run go on that trains attention only.
    """
    from peft.tuners.lora.layer import ParamWrapper

    if "experts" in plan.groups:
        wanted = set(plan.groups["experts"].targets)
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
    for group in plan.groups:
        if not counts.get(group):
            raise RuntimeError(f"LoRA group `{group}` has no trainable parameters after wrapping")
    if plan.router_policy != "freeze" and not counts.get("router"):
        raise RuntimeError(f"router policy `{plan.router_policy}` but no router parameter is trainable")
