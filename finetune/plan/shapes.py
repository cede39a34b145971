"""Sizes the planner needs, read from the model's module tree on the meta device (no weights).

Per decoder layer: attention widths, per-head q/k norms, routed experts (E, intermediate, top-k),
shared experts, a dense MLP; per model: parameter counts by kind, LoRA parameters per group
counted from the very shapes PEFT will wrap. Sits beside validate/export/eval: imports
modeling and lora only.

    finetune plan recipes/mixtral-8x7b/sft.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from finetune.lora.targets import Targets
from finetune.modeling import text_config
from finetune.moe import find_routers, unwrap


@dataclass
class LayerShape:
    """One decoder layer as the activation model sees it (widths in elements)."""

    params: int = 0
    """Every parameter of the layer (what a sharded strategy gathers)."""
    expert_params: int = 0
    q_out: int = 0
    kv_out: int = 0
    o_in: int = 0
    qk_norm: str = ""
    """'' (none), 'head' (Qwen3: RMSNorm per head) or 'full' (OLMoE: over the whole projection)."""
    experts: int = 0
    expert_inter: int = 0
    shared_inter: int = 0
    shared_gate: bool = False
    dense_inter: int = 0
    lora_attn: dict = field(default_factory=dict)
    """Attention target -> rank (q_proj, k_proj, v_proj, o_proj)."""
    lora_mlp: dict = field(default_factory=dict)
    lora_shared: dict = field(default_factory=dict)
    """LoRA ranks on the shared expert's linears, by leaf name (Qwen2-MoE, DeepSeek)."""
    lora_experts: dict = field(default_factory=dict)
    """gate_up_proj/down_proj -> rank; the planner also needs out widths: expert_out[name]."""
    expert_out: dict = field(default_factory=dict)


@dataclass
class ModelShape:
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    layers: list[LayerShape]
    total_params: int
    embed_params: int
    head_params: int
    """lm_head (0 when tied to the embeddings)."""
    lora_by_group: dict[str, int]
    lora_total: int
    router_full: int = 0
    """Router weights trained in full (router.policy: train)."""

    @property
    def expert_params(self) -> int:
        return sum(s.expert_params for s in self.layers)

    @property
    def active_params(self) -> int:
        """Parameters one token's forward multiplies by: all but the embedding lookup and the
        experts it is not routed to."""
        unused = sum(s.expert_params * (1 - self.top_k / s.experts) for s in self.layers if s.experts)
        return int(self.total_params - self.embed_params - unused)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the longest ModuleList in the tree (model.model.layers for every
    causal LM transformers ships)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("no decoder layers (nn.ModuleList) in the model")
    return max(lists, key=len)


def _numel(p) -> int:
    return int(p.numel())


def _layer_shape(layer: nn.Module, plan: Targets, hidden: int) -> tuple[LayerShape, dict[str, int]]:
    s = LayerShape(params=sum(_numel(p) for p in layer.parameters()))
    lora: dict[str, int] = {}
    groups = plan.groups
    attn_targets = groups["attention"].targets if "attention" in groups else []
    mlp_targets = groups["mlp"].targets if "mlp" in groups else []
    shared_targets = groups["shared_experts"].targets if "shared_experts" in groups else []
    expert_targets = groups["experts"].targets if "experts" in groups else []
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            if leaf == "q_proj":
                s.q_out = module.out_features
            elif leaf in ("k_proj", "v_proj"):
                s.kv_out = module.out_features
            elif leaf == "o_proj":
                s.o_in = module.in_features
            in_shared = "shared_expert" in name
            if leaf == "down_proj" and in_shared:
                s.shared_inter += module.in_features
            elif leaf == "down_proj" and "experts" not in name:
                s.dense_inter = module.in_features
            if leaf == "shared_expert_gate":
                s.shared_gate = True
            r = None
            # targets are leaf names, or layer-relative paths where a leaf name is ambiguous
            if any(name == t or name.endswith("." + t) for t in shared_targets):
                r, key, store = groups["shared_experts"].r, "shared_experts", s.lora_shared
            elif leaf in attn_targets and "attention" in groups:
                r, key, store = groups["attention"].r, "attention", s.lora_attn
            elif (leaf in mlp_targets or any(name.endswith("." + t) for t in mlp_targets)) and "mlp" in groups:
                r, key, store = groups["mlp"].r, "mlp", s.lora_mlp
            if r is not None:
                store[leaf] = r
                lora[key] = lora.get(key, 0) + r * (module.in_features + module.out_features)
        if leaf == "q_norm" and getattr(module, "weight", None) is not None:
            s.qk_norm = "full" if module.weight.numel() == s.q_out else "head"
        if leaf == "experts":
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() != 3:
                    continue
                s.expert_params += _numel(p)
                s.experts = p.shape[0]
                # (E, out, in) or transposed (gpt-oss): the side that is not the hidden size
                other = p.shape[1] if p.shape[2] == hidden else p.shape[2]
                if pname == "down_proj":
                    s.expert_inter = other
                if pname in expert_targets:
                    r = groups["experts"].r
                    s.lora_experts[pname] = r
                    s.expert_out[pname] = hidden if pname == "down_proj" else other
                    # one (r x in, out x r) pair per expert: E x r x (in + out)
                    lora["experts"] = lora.get("experts", 0) + p.shape[0] * r * (p.shape[1] + p.shape[2])
    if s.qk_norm == "full" and s.q_out == 0:
        s.qk_norm = "head"
    return s, lora


def model_shape(config, model: nn.Module, plan: Targets) -> ModelShape:
    """Sizes of `model` (built on the meta device) and of the LoRA the plan puts on it."""
    cfg = text_config(config)
    layers, lora = [], {}
    for layer in decoder_layers(model):
        shape, counts = _layer_shape(layer, plan, cfg.hidden_size)
        layers.append(shape)
        for k, v in counts.items():
            lora[k] = lora.get(k, 0) + v
    router_full = 0
    routers = [unwrap(r.module) for r in find_routers(model)]
    if plan.router_policy == "lora" and plan.router_lora is not None:
        lora["router"] = sum(plan.router_lora.r * sum(g.weight.shape) for g in routers)
    elif plan.router_policy == "train":
        router_full = sum(g.weight.numel() for g in routers)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = 0 if head is None or head.weight is embed else _numel(head.weight)
    heads = cfg.num_attention_heads
    return ModelShape(
        hidden=cfg.hidden_size,
        vocab=embed.shape[0],
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        top_k=getattr(cfg, "num_experts_per_tok", 0) or 0,
        layers=layers,
        total_params=sum(_numel(p) for p in model.parameters()),
        embed_params=_numel(embed),
        head_params=head_params,
        lora_by_group=lora,
        lora_total=sum(lora.values()) + router_full,
        router_full=router_full,
    )
