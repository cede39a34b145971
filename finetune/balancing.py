"""How a Mixture-of-Experts family balances its experts: an aux (load-balancing) loss, or not.

    finetune validate RECIPE     # `router.aux_loss_coef` on a family without an aux loss is an error here

Families differ, and the config alone does not say which is which (checked with transformers 5.25):
- most (Mixtral, Qwen2/3-MoE, Qwen3-Next, Qwen3.5-MoE, OLMoE, gpt-oss, Granite-MoE, Phi-3.5-MoE)
  compute `aux_loss` from the router logits in their CausalLM forward when `output_router_logits`
  is on, and add `router_aux_loss_coef` times it to their own loss;
- DeepSeek-V3 and GLM-4-MoE declare `output_router_logits` but compute no aux loss: their routers
  balance with an `e_score_correction_bias` buffer (aux-loss-free balancing), which transformers
  keeps as loaded and nothing here updates;
- Llama-4's config declares `router_aux_loss_coef` (0.001) although its forward computes none;
- Gemma-4 has neither field.
So whether a family has an aux loss is read from its CausalLM forward (it assigns `aux_loss` from
a call), and its bias buffers from its routers (finetune/moe.py's find_routers). TRL's SFT and DPO
forwards (its fused LM head) compute the aux loss themselves, with Mixtral's
load_balancing_loss_func, from the router logits of any model that returns them: for the families
above that have one it equals their own (tests/unit/test_balancing.py); on DeepSeek-V3 a
coefficient stopped the run with an AttributeError after the weights loaded (its config names
no `num_local_experts`), and elsewhere it would impose a loss the family was not trained with.
Validate refuses such a coefficient first.
Layer: beside modeling and moe; imports them and errors.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field

from torch import nn

from finetune import modeling
from finetune.errors import Problem
from finetune.moe import find_routers, unwrap

COEF_FIELD = "router_aux_loss_coef"
SWITCH_FIELD = "output_router_logits"


@dataclass
class Balancing:
    """A family's expert balancing, as read from its config, forward and routers."""

    model_type: str
    model_class: str
    aux_loss: bool
    """The CausalLM forward returns an aux loss (TRL can weight and add it)."""
    reason: str = ""
    """Why there is no aux loss (empty when there is one)."""
    config_coef: float | None = None
    """`router_aux_loss_coef` in the model's config, if it declares one."""
    router_parameters: list[str] = field(default_factory=list)
    """Parameter names of one router module, e.g. weight, bias (gpt-oss), proj.weight (Gemma-4)."""
    router_buffers: list[str] = field(default_factory=list)
    """Buffer names of one router module, e.g. e_score_correction_bias (DeepSeek-V3): never trained."""

    def summary(self, coef: float) -> str:
        """One line for `finetune validate` and the run summary."""
        if self.aux_loss:
            return f"aux loss x {coef:g}" if coef else "aux loss off (coefficient 0)"
        return f"no aux loss: {self.reason}"

    def policy_note(self, policy: str) -> str:
        """What a router policy does with this family's router parameters and buffers."""
        params = ", ".join(self.router_parameters) or "none"
        if policy == "train":
            what = f"trained in full: {params}"
        elif policy == "lora":
            weight = next((p for p in self.router_parameters if p.endswith("weight")), "weight")
            rest = [p for p in self.router_parameters if p != weight]
            what = f"LoRA on {weight}" + (f"; {', '.join(rest)} frozen" if rest else "")
        else:
            what = f"frozen: {params}"
        if self.router_buffers:
            what += f"; buffer {', '.join(self.router_buffers)} kept as loaded (buffers are not trained)"
        return what


def computes_aux_loss(model_class: type) -> bool | None:
    """Whether `model_class.forward` assigns `aux_loss` from a call (transformers' MoE families call
    their load_balancing_loss_func there); None when its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(model_class.forward))
    except (OSError, TypeError):
        return None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named = any(isinstance(t, ast.Name) and t.id == "aux_loss" for t in targets)
            if named and isinstance(node.value, ast.Call):
                return True
    return False


def of_model(config, model: nn.Module) -> Balancing:
    """The balancing of `model` (a CausalLM, also on the meta device) with its `config`."""
    cfg = modeling.text_config(config)
    model_class = type(unwrap(model))
    routers = find_routers(model)
    router = unwrap(routers[0].module) if routers else None
    params = [n for n, _ in router.named_parameters()] if router is not None else []
    buffers = [n for n, _ in router.named_buffers()] if router is not None else []
    coef = getattr(cfg, COEF_FIELD, None)
    computes = computes_aux_loss(model_class)
    if computes is None:  # no source (compiled remote code): trust the config, as TRL does
        computes = hasattr(cfg, SWITCH_FIELD) and coef is not None
    switch = hasattr(cfg, SWITCH_FIELD)
    reason = ""
    if not computes:
        reason = f"{model_class.__name__}'s forward computes none"
        if coef is not None:
            reason += f" (its config's {COEF_FIELD}={coef:g} is not used)"
    elif not switch:
        reason = f"its config has no `{SWITCH_FIELD}`, which TRL needs to ask {model_class.__name__} for one"
    if reason and buffers:
        reason += (f"; its routers balance with the {', '.join(buffers)} buffer instead (aux-loss-free balancing), "
                   "which transformers does not update in training")
    return Balancing(
        model_type=getattr(cfg, "model_type", "") or model_class.__name__,
        model_class=model_class.__name__,
        aux_loss=switch and computes,
        reason=reason,
        config_coef=float(coef) if isinstance(coef, (int, float)) else None,
        router_parameters=params,
        router_buffers=buffers,
    )


def default_coef(balancing: Balancing | None) -> float:
    """The coefficient when a recipe sets none: the config's, where the family has an aux loss."""
    if balancing is None or not balancing.aux_loss:
        return 0.0
    return balancing.config_coef or 0.0


def coef_problems(coef, balancing: Balancing) -> list[Problem]:
    """`router.aux_loss_coef` > 0 on a family without an aux loss is an error (0 is allowed: it is off)."""
    if balancing.aux_loss or not isinstance(coef, (int, float)) or not coef:
        return []
    return [Problem("router.aux_loss_coef", f"model type `{balancing.model_type}` has no load-balancing aux loss in "
                    f"transformers: {balancing.reason}. Remove router.aux_loss_coef (or set it to 0); "
                    "router.policy still applies to its routers")]


def apply_aux_loss(model: nn.Module, coef: float, balancing: Balancing | None) -> None:
    """Put the recipe's coefficient where the model reads it, the same before SFT and DPO.

    TRL weights `outputs.aux_loss` by its own `router_aux_loss_coef` and asks for router logits
    per forward: the training forward in SFT (SFTTrainer also switches the config on) and the
    policy forward in DPO (a flag), not DPO's reference forward. So `output_router_logits` stays
    off in the config (a checkpoint saved with it on would make every other forward compute a
    discarded aux loss), and the coefficient goes into the text config and the CausalLM's copy,
    which it takes at construction and adds to its own loss (TRL's sequence-parallel path uses
    that loss), so `router.aux_loss_coef` takes effect there too.
    """
    router_logits_off(model)
    if balancing is None or not balancing.aux_loss:
        return  # validate refused a non-zero coefficient for such a family
    setattr(_configs(model)[-1], COEF_FIELD, float(coef))
    for module in model.modules():
        if isinstance(getattr(module, COEF_FIELD, None), float):
            setattr(module, COEF_FIELD, float(coef))


def _configs(model: nn.Module) -> list:
    """The model's config and its text config (one object for a text-only model)."""
    outer = model.config
    inner = modeling.text_config(outer)
    return [outer] if inner is outer else [outer, inner]


def router_logits_off(model: nn.Module) -> None:
    """Switch off `output_router_logits` in the config (for training and inference). A checkpoint
    saved with it on makes every forward compute the aux loss, and inside `generate` (one new
    token per step against the whole attention mask) that fails with a shape mismatch in batched
    generation."""
    for config in _configs(model):
        if getattr(config, SWITCH_FIELD, False):
            setattr(config, SWITCH_FIELD, False)
