"""LoRA targets and router policy: from a recipe's `lora:`/`router:` sections to a peft.LoraConfig.

Targets are grouped (attention, experts, shared_experts, mlp, router); each group's defaults
come from the model's structure (finetune/moe.py: the attention Linears whatever their names,
the fused experts' weights, the shared experts, the dense MLP layers of an MoE model), so every
family gets its own defaults without a hand list. Expert weights in transformers 5
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
from finetune.moe import (
    LayerParts,
    expert_weight_names,
    experts_modules,
    find_routers,
    structure,
)
from finetune.recipe import (
    ATTENTION_TARGETS,
    DENSE_MLP_TARGETS,
    EXPERT_ALIASES,
    LoraGroup,
    LoraSection,
    RouterSection,
)

GROUPS = ["attention", "experts", "shared_experts", "mlp"]
ROUTER_LORA_DEFAULT = LoraGroup(r=8, alpha=16.0)


@dataclass
class Targets:
    """What will be adapted: per group, its rank/alpha and the resolved target names."""

    groups: dict[str, LoraGroup] = field(default_factory=dict)
    router_modules: list[str] = field(default_factory=list)
    """Suffixes of router modules, e.g. `mlp.gate` (relative to a decoder layer)."""
    router_weights: list[str] = field(default_factory=list)
    """Suffixes of the routers' 2-D weights, e.g. `mlp.gate.weight`, `router.proj.weight` (Gemma-4)."""
    router_policy: str = "freeze"
    router_lora: LoraGroup | None = None
    dropout: float = 0.0


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


def _shortest(paths: list[str], others: list[str]) -> list[str]:
    """Each layer-relative path by its leaf name where that name is nowhere else in `others`
    (Mixtral's attention stays `q_proj`...), else by the whole relative path."""
    clash = {p.rsplit(".", 1)[-1] for p in others}
    return _unique(p.rsplit(".", 1)[-1] if p.rsplit(".", 1)[-1] not in clash else p for p in paths)


def default_targets(model: nn.Module, moe: bool) -> dict[str, list[str]]:
    """Each group's default targets, from the model's structure; a group the model lacks is absent."""
    parts: list[LayerParts] = structure(model)
    attention = [p for lp in parts for p in lp.attention]
    others = [p for lp in parts for p in lp.shared + lp.dense_mlp]
    out = {"attention": _shortest(attention, others) or list(ATTENTION_TARGETS)}
    if not moe:
        out["mlp"] = list(DENSE_MLP_TARGETS)
        return out
    experts = experts_modules(model)
    if experts:
        out["experts"] = expert_weight_names(experts[0])
    shared = _unique(p for lp in parts for p in lp.shared)
    if shared:
        out["shared_experts"] = shared
    dense = _unique(p for lp in parts for p in lp.dense_mlp)
    if dense:
        out["mlp"] = dense
    return out


MISSING = {
    "experts": "the model is dense (no MoE experts); use lora.mlp for its MLP",
    "shared_experts": "the model has no shared experts; remove lora.shared_experts",
    "mlp": "every layer of this Mixture-of-Experts model is an MoE layer (no dense MLP layers); "
           "its MLPs are lora.experts (and lora.shared_experts where it has them)",
}


def resolve_targets(section: LoraSection, router: RouterSection, model: nn.Module, moe: bool) -> tuple[Targets, list[Problem]]:
    """Resolve groups against the model's module tree; every unmatched target is a problem."""
    problems: list[Problem] = []
    resolved = Targets(router_policy=router.policy, dropout=section.dropout)
    module_names = [n for n, _ in model.named_modules()]
    param_names = [n for n, _ in model.named_parameters()]
    defaults = default_targets(model, moe)
    if moe and "experts" not in defaults and section.experts is not False:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        problems.append(Problem("lora.experts", f"model type `{model_type}`: its experts cannot be adapted (no fused "
                                "3-D expert parameters gate_up_proj/up_proj + down_proj found); "
                                "training would silently be attention only. Set lora.experts: false to train without them"))

    for group_name in GROUPS:
        group = getattr(section, group_name)
        if group is False or (group_name == "experts" and problems and "experts" not in defaults):
            continue
        if group is None:
            if group_name not in defaults:
                continue
            group = LoraGroup()
        if group_name not in defaults and not group.targets:
            problems.append(Problem(f"lora.{group_name}", MISSING[group_name]))
            continue
        if group_name == "experts" and not moe:
            problems.append(Problem("lora.experts", MISSING["experts"]))
            continue
        names = []
        for t in group.targets or defaults[group_name]:
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
    resolved.router_weights = sorted({f"{r.suffix}.{r.weight_name}" for r in routers})
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
                # `down_proj` elsewhere can never be taken for the fused expert parameter, nor get
                # its rank (rank_pattern keys are matched as suffixes of shared-expert names too).
                t = f"experts.{t}"
                target_parameters.append(t)
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
        for weight in targets.router_weights:
            target_parameters.append(weight)
            rank_pattern[weight] = targets.router_lora.r
            alpha_pattern[weight] = targets.router_lora.alpha
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


def parameter_group(name: str, targets: Targets | None = None) -> str:
    """Which recipe group a (PEFT-wrapped) parameter name belongs to: by the resolved targets when
    given (every family), else by Mixtral's names."""
    if ".experts." in name or name.endswith(".experts"):
        return "experts"
    if targets is not None:
        dotted = f".{name}."
        if "modules_to_save" in name or any(f".{s}." in dotted for s in targets.router_modules):
            return "router"
        for group_name in ("shared_experts", "mlp", "attention"):
            group = targets.groups.get(group_name)
            if group and any(f".{t}." in dotted for t in group.targets):
                return group_name
        return "other"
    if ".gate." in name and ".mlp." in name or "modules_to_save" in name or ".gate.weight" in name:
        return "router"
    if "self_attn" in name or "attention" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def trainable_by_group(model: nn.Module, targets: Targets | None = None) -> dict[str, int]:
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[parameter_group(name, targets)] += p.numel()
    return dict(counts)


def expected_trainable(model: nn.Module, targets: Targets) -> dict[str, int]:
    """Trainable parameters per group computed from shapes alone (the meta model `finetune validate`
    builds): r*(in+out) per targeted Linear, r*E*(in+out) per fused 3-D expert weight (PEFT's
    ParamWrapper: one rank-r pair per expert), the router's parameters in full for policy `train`,
    r*(in+out) on its 2-D weight for policy `lora`. A test compares it with PEFT's real count."""
    counts: Counter = Counter()
    for group_name, group in targets.groups.items():
        for t in group.targets:
            if group_name == "experts":
                for name, p in model.named_parameters():
                    if name.endswith(f".experts.{t}"):
                        e, a, b = p.shape
                        counts[group_name] += group.r * e * (a + b)
            else:
                for name, m in model.named_modules():
                    if isinstance(m, nn.Linear) and (name == t or name.endswith(f".{t}")):
                        counts[group_name] += group.r * (m.in_features + m.out_features)
    routers = find_routers(model)
    if targets.router_policy == "train":
        counts["router"] += sum(p.numel() for r in routers for p in r.module.parameters())
    elif targets.router_policy == "lora":
        for r in routers:
            rows, cols = r.module.get_parameter(r.weight_name).shape
            counts["router"] += targets.router_lora.r * (rows + cols)
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
    counts = trainable_by_group(model, targets)
    for group in targets.groups:
        if not counts.get(group):
            raise RuntimeError(f"LoRA group `{group}` has no trainable parameters after wrapping")
    if targets.router_policy != "freeze" and not counts.get("router"):
        raise RuntimeError(f"router policy `{targets.router_policy}` but no router parameter is trainable")
