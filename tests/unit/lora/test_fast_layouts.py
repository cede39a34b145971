"""The fast expert LoRA path (finetune/lora/fast_experts.py) on every experts layout transformers
ships, against PEFT's stock path: equal outputs and gradients (inputs, routing weights, LoRA A and
B, trainable biases), fp32, rtol 1e-4 and atol 1e-5 x the tensor's largest magnitude.

    pytest tests/unit/lora/test_fast_layouts.py      # CPU, offline, a few seconds

Each layout class is one family's own experts module (its own `_apply_gate`, `act_fn`, norm), built
from that family's tiny config (bench/tiny_configs.py) and wrapped by PEFT exactly as in training.
The layout classes are read from transformers' sources (the `@use_experts_implementation(...)` flags
and whether the class brings its own `_apply_gate`), so a new layout in a later transformers fails
`test_every_layout_in_transformers_is_covered` instead of passing unseen.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from finetune.lora import grouped_mm
from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.moe import expert_weight_names

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import tiny_configs  # the tiny config of each family, shared with the support matrix

# layout signature (decorator arguments, own _apply_gate) -> (model type, experts class) standing for it
LAYOUTS = {
    ("", False): ("mixtral", "MixtralExperts"),  # (E, 2I, H) gate then up, act_fn; 57 families
    ("", True): ("deepseek_v4", "DeepseekV4Experts"),  # concatenated, clamped SwiGLU of its own
    ("(is_transposed=True)", False): ("aria", "AriaExperts"),  # (E, H, 2I)
    ("(has_gate=False, is_transposed=True)", False): ("ergo", "ErgoExpertProjections"),  # up only, (E, in, out)
    ("(is_concatenated=False, is_transposed=True, has_bias=True)", True): ("gpt_oss", "GptOssExperts"),
    ("(has_post_expert_norm=True)", False): ("muse_spark", "MuseSparkExperts"),
    ("(has_gate=False)", False): ("nemotron_h", "NemotronHExperts"),
    ("(is_transposed=True, has_bias=True)", True): ("openai_privacy_filter", "OpenAIPrivacyFilterExperts"),
}
DECORATED = re.compile(r"@use_experts_implementation(\([^)]*\))?\s*\nclass (\w+)\(")


def layouts_in_transformers() -> dict[tuple[str, bool], list[str]]:
    found: dict[tuple[str, bool], list[str]] = {}
    for path in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        src = path.read_text(encoding="utf-8")
        for m in DECORATED.finditer(src):
            body = src[m.end():]
            body = body[:re.search(r"\n(class |@)", body).start()] if re.search(r"\n(class |@)", body) else body
            found.setdefault((m.group(1) or "", "def _apply_gate" in body), []).append(m.group(2))
    return found


def test_every_layout_in_transformers_is_covered():
    found = layouts_in_transformers()
    assert found, "no @use_experts_implementation class found: did transformers move them?"
    assert set(found) <= set(LAYOUTS), {k: v for k, v in found.items() if k not in LAYOUTS}


def experts_of(model_type: str, cls_name: str, impl: str, package: str | None = None):
    config = tiny_configs.tiny_config(model_type)
    config._experts_implementation = impl
    package = package or model_type
    cls = getattr(importlib.import_module(f"transformers.models.{package}.modeling_{package}"), cls_name)
    torch.manual_seed(0)
    experts = cls(config).float()
    with torch.no_grad():  # fused weights start as torch.empty; norms at one: make every part matter
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return experts


class Block(torch.nn.Module):
    """The experts module alone, called as its MoE block calls it."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts(hidden, top_k_index, top_k_weights)


def wrapped(experts, train_bias: bool = False):
    names = expert_weight_names(experts)
    model = get_peft_model(Block(experts), LoraConfig(r=4, lora_alpha=8, target_parameters=[f"experts.{n}" for n in names]))
    with torch.no_grad():  # PEFT inits B to zero, which would hide any error in the B·A product
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
            if n.endswith("_bias"):
                p.requires_grad_(train_bias)
    return model


def routing(experts, tokens: int = 12):
    """Top-k expert ids with expert 2 never chosen (an empty group), and differentiable weights.
    Ergo's projections take one route per row at unit weight (its eager forward ignores the weights)."""
    ergo = type(experts).__name__ == "ErgoExpertProjections"
    k = 1 if ergo else 2
    g = torch.Generator().manual_seed(3)
    pool = torch.tensor([e for e in range(experts.num_experts) if e != 2])
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1).requires_grad_(not ergo)
    down = experts.down_proj.shape  # the experts' own width (Muse Spark's moe_hidden_size is not hidden_size)
    hidden = torch.randn(tokens, down[2] if experts.is_transposed else down[1], generator=g).requires_grad_(True)
    return hidden, idx, weights


def run(model, hidden, idx, weights):
    model.zero_grad(set_to_none=True)
    for t in (hidden, weights):
        t.grad = None
    out = model(hidden, idx, weights)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    out = {"output": out.detach(), "hidden grad": hidden.grad.clone(), **grads}
    return out | ({"weights grad": weights.grad.clone()} if weights.requires_grad else {})


def assert_same(fast: dict, stock: dict) -> None:
    assert fast.keys() == stock.keys()
    for key, want in stock.items():
        atol = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(fast[key], want, rtol=1e-4, atol=atol, msg=lambda m, key=key: f"{key}: {m}")
        if "lora_" in key:
            assert fast[key].abs().sum() > 0, f"{key}: no gradient reached the adapter"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])  # the family's own forward; transformers' grouped one
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=[t for t, _ in LAYOUTS.values()])
def test_fast_equals_stock(layout, impl):
    model_type, cls_name = LAYOUTS[layout]
    experts = experts_of(model_type, cls_name, impl)
    model = wrapped(experts, train_bias=experts.has_bias)
    args = routing(experts)
    stock = run(model, *args)
    assert enable_fast_expert_lora(model) == 1
    assert_same(run(model, *args), stock)
    if experts.has_bias:
        assert any(k.endswith("_bias") for k in stock), "biases were meant to train here"


@pytest.mark.parametrize("layout", [k for k, v in LAYOUTS.items() if "is_transposed=True" in k[0]],
                         ids=lambda k: LAYOUTS[k][0])
def test_loop_branch_on_transposed_layouts(layout, monkeypatch):
    """The torch.mm loop (used where torch._grouped_mm cannot run) on (E, in, out) weights too."""
    monkeypatch.setitem(grouped_mm.GROUPED_MM, "cpu", ())
    experts = experts_of(*LAYOUTS[layout], "grouped_mm")
    model = wrapped(experts, train_bias=experts.has_bias)
    args = routing(experts)
    stock = run(model, *args)
    assert enable_fast_expert_lora(model) == 1
    assert_same(run(model, *args), stock)


def test_overridden_forward_stays_stock_with_reason():
    """Ergo's experts wrap the dispatched forward (a token per route, a norm per route): the fast path
    would skip that code, so the module stays on PEFT's path and the warning names the reason."""
    experts = experts_of("ergo", "ErgoExperts", "grouped_mm")
    model = wrapped(experts)
    args = routing(experts)
    stock = run(model, *args)
    with pytest.warns(UserWarning, match="ErgoExperts overrides the dispatched experts forward"):
        assert enable_fast_expert_lora(model) == 0
    assert_same(run(model, *args), stock)


def test_llama4_text_experts_stay_stock_with_reason():
    experts = experts_of("llama4_text", "Llama4TextExperts", "eager", package="llama4")
    model = get_peft_model(Block(experts), LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    with pytest.warns(UserWarning, match="Llama4TextExperts is not a transformers @use_experts_implementation"):
        assert enable_fast_expert_lora(model) == 0


def test_gpt_oss_model_through_peft():
    """The whole tiny gpt-oss (its router, sinks, sliding window) with LoRA on attention and experts."""
    config = tiny_configs.tiny_config("gpt_oss")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # biases and sinks start at zero: make them matter
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return {"logits": logits.detach()} | {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    stock = step()
    assert enable_fast_expert_lora(model) == config.num_hidden_layers
    assert_same(step(), stock)
