"""The MoE structure of a model, found from its module tree: routers, fused experts, MoE blocks.

    finetune validate RECIPE     # LoRA targets and router policy are matched against this

One rule serves training (LoRA targets, router policies), routing capture, ZeRO-3 leaf modules
and 4-bit loading, so they can never disagree about what a router is:
- fused experts: a module holding 3-D expert weights (a transformers `@use_experts_implementation`
  module, or Llama-4's text experts): `gate_up_proj` or `up_proj`, and `down_proj`;
- an MoE block: a module with an `experts` child;
- its router: the block's child (whatever its attribute name: Mixtral's `gate`, gpt-oss's
  `router`) whose weight (or its one Linear's, Gemma-4's `router.proj`) is 2-D with one row per
  expert; bias buffers such as DeepSeek's `e_score_correction_bias` ride along. A shared
  expert's one-row gate (Qwen2-MoE's `shared_expert_gate`) therefore is not a router;
- the rest of a decoder layer (`structure`): its attention module (a child named or typed
  attention: `self_attn`, `linear_attn`, MLA) and every Linear under it, whatever their names;
  shared experts (the block's other children holding Linears, and its one-row gates); dense
  MLP layers (the MLP of a layer with no MoE block: DeepSeek's `first_k_dense_replace`; not a
  convolving token mixer such as Nemotron-H's Mamba).
PEFT wrappers (LoRA layers, modules_to_save copies) are looked through, and a parameter that
DeepSpeed ZeRO-3 holds partitioned is measured by its `ds_shape`.
Layer: beside modeling; imports nothing of finetune.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def shape_of(param) -> tuple:
    """A parameter's shape, also when DeepSpeed ZeRO-3 holds it partitioned (its data is then a
    (0,) placeholder between forwards; `ds_shape` is the real shape)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def unwrap(module: nn.Module) -> nn.Module:
    """Peel PEFT wrappers: ModulesToSaveWrapper (.original_module) and LoRA layers (.base_layer)."""
    for _ in range(8):  # nested ParamWrappers when several parameters of one module are targeted
        inner = module.__dict__.get("_modules", {})
        if "original_module" in inner:
            module = inner["original_module"]
        elif "base_layer" in inner:
            module = inner["base_layer"]
        else:
            break
    return module


def expert_weight_names(experts: nn.Module) -> list[str]:
    has_gate = getattr(experts, "has_gate", isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter))
    return ["gate_up_proj" if has_gate else "up_proj", "down_proj"]


def is_fused_expert_weight(module: nn.Module, name: str) -> bool:
    """`name` is a fused 3-D expert weight of an experts module (also on the meta device): a
    transformers `@use_experts_implementation` module, or one holding the same 3-D parameters
    without it (Llama-4's text experts)."""
    if name not in ("gate_up_proj", "up_proj", "down_proj") or name not in expert_weight_names(module):
        return False
    weights = [getattr(module, n, None) for n in expert_weight_names(module)]
    return all(isinstance(w, nn.Parameter) and len(shape_of(w)) == 3 for w in weights)


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """Every fused-experts module of the model (PEFT wrappers around them are not returned)."""
    return [m for m in model.modules() if is_fused_expert_weight(m, "down_proj")]


def num_experts(experts: nn.Module) -> int | None:
    """How many experts a fused-experts module holds (its attribute, else a 3-D weight's first dim)."""
    count = getattr(experts, "num_experts", None)
    if isinstance(count, int):
        return count
    shapes = [shape_of(p) for p in unwrap(experts).parameters(recurse=False)]
    return next((s[0] for s in shapes if len(s) == 3), None)


@dataclass
class Router:
    """One MoE block's router as found in the module tree."""

    layer: int
    """Decoder layer index, parsed from the module path."""
    name: str
    """Full path of the router module (the outermost PEFT wrapper around it, when wrapped)."""
    module: nn.Module
    """The module at `name` (hook this one: it is what the block calls)."""
    weight_name: str = "weight"
    """The 2-D weight, one row per expert, relative to the router module."""

    @property
    def block(self) -> str:
        """Path of the MoE block holding the router, e.g. `model.layers.3.mlp`."""
        return self.name.rpartition(".")[0]

    @property
    def suffix(self) -> str:
        """The path below the decoder layer, e.g. `mlp.gate`: what PEFT matches on."""
        parts = self.name.split(".")
        numbers = [i for i, part in enumerate(parts) if part.isdigit()]
        return ".".join(parts[numbers[0] + 1:]) if numbers else self.name


def router_weight_name(router: nn.Module, experts: int, exact: bool = True) -> str | None:
    """The router's 2-D weight with one row per expert, relative to the router module: `weight`, or a
    Linear's inside it (Gemma-4's `proj.weight`, Zaya's MLP router `router_mlp.out_proj.weight`).
    With exact=False also one row per choice where the router chooses among more than the fused
    experts, at most twice as many (LongCat-Flash's zero-computation experts, Inkling's shared
    experts, Zaya's extra choice): rows in [experts, 2 * experts]."""
    router = unwrap(router)
    candidates = [("weight", getattr(router, "weight", None))]
    candidates += [(f"{n}.weight", getattr(unwrap(m), "weight", None)) for n, m in router.named_modules()
                   if n and "lora_" not in n and "modules_to_save" not in n and "original_module" not in n
                   and not n.endswith("base_layer")]
    for name, weight in candidates:
        if isinstance(weight, torch.Tensor) and len(shape_of(weight)) == 2:
            rows = shape_of(weight)[0]
            if rows == experts or (not exact and experts < rows <= 2 * experts):
                return name
    return None


def _router_child(block: nn.Module, experts: int) -> tuple[str, nn.Module, str] | None:
    for exact in (True, False):  # a child with one row per expert wins over one with extra choices
        for child_name, child in block.named_children():
            if child_name == "experts":
                continue
            weight = router_weight_name(child, experts, exact)
            if weight:
                return child_name, child, weight
    return None


def find_routers(model: nn.Module) -> list[Router]:
    """Every MoE router under `model`, ordered by decoder layer."""
    found = []
    for block_name, block in model.named_modules():
        experts = block.__dict__.get("_modules", {}).get("experts")
        if not isinstance(experts, nn.Module):
            continue
        count = num_experts(unwrap(experts))
        hit = _router_child(block, count) if count else None
        if hit is None:
            continue
        child_name, child, weight = hit
        numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", block_name)
        layer = int(numbers[-1]) if numbers else len(found)
        found.append(Router(layer, f"{block_name}.{child_name}" if block_name else child_name, child, weight))
    return sorted(found, key=lambda r: r.layer)


def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse MoE blocks (modules holding both experts and a router)."""
    blocks = {r.block for r in find_routers(model)}
    return sorted({type(unwrap(model.get_submodule(b))) for b in blocks}, key=lambda c: c.__name__)


ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)


def decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(path, layers) of the decoder stack, whatever it is called: the longest ModuleList of
    transformers decoder layers (GradientCheckpointingLayer), else the longest ModuleList. A layer's
    own lists (LongCat-Flash's two attentions per layer) may be longer than a shallow stack."""
    best, best_layers = ("", []), ("", [])
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best[1]):
            best = (name, list(module))
        if (isinstance(module, nn.ModuleList) and len(module) > len(best_layers[1])
                and all(isinstance(unwrap(m), GradientCheckpointingLayer) for m in module)):
            best_layers = (name, list(module))
    return best_layers if best_layers[1] else best


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes x·Wᵀ (+ b), which LoRA's B·A update adds to. A model's own Linear
    subclass with another forward (DeepSeek-V4's grouped output projection `o_a_proj`: one block per
    head group) is not: LoRA on it would add a full-width update of the wrong shape."""
    own = type(module).__module__.startswith("transformers.models.") and type(module).forward is not nn.Linear.forward
    return isinstance(module, nn.Linear) and not own


def _linears(module: nn.Module, prefix: str) -> list[str]:
    """Paths (under `prefix`) of every plain nn.Linear in `module`, PEFT wrappers looked through."""
    out = []
    for name, child in unwrap(module).named_children():
        path = f"{prefix}.{name}" if prefix else name
        inner = unwrap(child)
        if plain_linear(inner):
            out.append(path)
        elif "lora_A" not in name and "modules_to_save" not in name:
            out.extend(_linears(inner, path))
    return out


@dataclass
class LayerParts:
    """One decoder layer's parts, as paths relative to the layer (what PEFT matches on)."""

    attention: list[str]
    """Every Linear under the layer's attention module(s)."""
    shared: list[str]
    """Linears of shared experts (and their one-row gates) of the layer's MoE block."""
    dense_mlp: list[str]
    """Linears of the layer's MLP when the layer has no MoE block."""
    moe: bool


def structure(model: nn.Module) -> list[LayerParts]:
    """Every decoder layer's attention, shared-expert and dense-MLP Linears (see the module docstring)."""
    stack, layers = decoder_layers(model)
    routers = {r.block: r for r in find_routers(model)}
    out = []
    for i, layer in enumerate(layers):
        prefix = f"{stack}.{i}"
        attention, shared, dense = [], [], []
        block = next((b for b in routers if b == prefix or b.startswith(prefix + ".")), None)
        block_rel = block[len(prefix) + 1:] if block and block != prefix else ""
        for name, child in unwrap(layer).named_children():
            inner = unwrap(child)
            if ATTENTION_NAME.search(name) or ATTENTION_NAME.search(type(inner).__name__):
                attention.extend(_linears(inner, name))
            elif block is not None and name == block_rel:
                router = routers[block].name.rsplit(".", 1)[-1]
                for sub, part in inner.named_children():
                    if sub in ("experts", router):
                        continue
                    path = f"{name}.{sub}"
                    shared.extend([path] if isinstance(unwrap(part), nn.Linear) else _linears(part, path))
            elif block == prefix and name not in ("experts", routers[block].name.rsplit(".", 1)[-1]):
                shared.extend([name] if isinstance(inner, nn.Linear) and "proj" not in name else _linears(inner, name))
            elif block is None and not _token_mixer(inner):
                dense.extend(_linears(inner, name))
        out.append(LayerParts(attention, [s for s in shared if not _per_layer_input(s)], dense, block is not None))
    return out


def _token_mixer(module: nn.Module) -> bool:
    """A sequence mixer that is not named attention (Nemotron-H's Mamba `mixer`, LFM2's short
    convolution): it convolves over positions, which an MLP never does. Not the `mlp` group (PEFT
    refuses LoRA on Mamba's in/out projections)."""
    return any(isinstance(m, nn.Conv1d) for m in module.modules())


def _per_layer_input(path: str) -> bool:
    # Gemma-4's per-layer input gate/projection are not an MLP: leave them to the user's explicit targets.
    return "per_layer" in path
