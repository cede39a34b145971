"""finetune/lora/fast_experts.py against PEFT's own target_parameters path, on tiny random Mixtrals.

Run: `pytest tests/unit/lora/test_fast_experts.py` (CPU, offline, well under a minute).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from finetune.lora import grouped_mm
from finetune.lora.fast_experts import disable_fast_expert_lora, enable_fast_expert_lora

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
E, H, I = 4, 32, 48  # experts, hidden, intermediate; expert-weight sizes collide with no activation




def tiny_config(top_k: int = 2, act: str = "silu") -> MixtralConfig:
    return MixtralConfig(
        vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=top_k, max_position_embeddings=64,
        hidden_act=act,
    )


def build(dtype=torch.float32, top_k=2, train_router=False, impl="grouped_mm", act="silu", seed=0):
    """(PEFT model with non-zero LoRA B, untouched copy of the base model)."""
    torch.manual_seed(seed)
    base = MixtralForCausalLM(tiny_config(top_k, act)).to(dtype).eval()
    base.set_experts_implementation(impl)
    ref = copy.deepcopy(base)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    model = get_peft_model(base, lora)
    randomize_b(model)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(train_router)
    return model, ref


def randomize_b(model) -> None:
    with torch.no_grad():  # PEFT inits B to zero, which would hide any error in the B·A product
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


def force_routing(model, choose) -> None:
    """Route by `choose(num_tokens) -> (T, k) expert ids`; weights stay differentiable softmax."""

    def forward(self, h):
        h = h.reshape(-1, self.hidden_dim)
        logits = F.linear(h, self.weight)
        idx = choose(h.shape[0])
        w = torch.softmax(logits.float(), -1).gather(1, idx)
        return logits, w / w.sum(-1, keepdim=True), idx

    for name, m in model.named_modules():
        if name.endswith("mlp.gate"):
            m.forward = types.MethodType(forward, m)


def run(model, ids):
    """Logits, grad of the input embeddings, and grads of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits.float() * probe).sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float(), emb.grad.float(), grads


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_close(a, b, dtype, what):
    if dtype == torch.float32:  # atol relative to the tensor's scale: sums of a few dozen fp32 terms
        atol = 1e-5 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")
    else:  # bf16: the paths round differently (PEFT rounds W + sBA to bf16); compare in norm
        assert rel_err(a, b) < 5e-2, f"{what}: relative error {rel_err(a, b):.3g}"


def compare_paths(model, ids, dtype):
    stock = run(model, ids)
    assert enable_fast_expert_lora(model) == 2
    fast = run(model, ids)
    assert_close(fast[0], stock[0], dtype, "logits")
    assert_close(fast[1], stock[1], dtype, "input-embedding grad")
    assert stock[2].keys() == fast[2].keys()
    assert any("experts" in n and "lora_A" in n for n in fast[2]), "expert LoRA not trainable?"
    for name in stock[2]:
        if "experts" in name:  # (one token: attention's q grad is exactly zero; forced top-1: router's)
            assert fast[2][name].abs().sum() > 0, name
        assert_close(fast[2][name], stock[2][name], dtype, name)
    return stock, fast


SCENARIOS = {
    # name: (top_k, tokens (batch, seq), forced routing or None)
    "random": (2, (2, 12), None),
    "all_on_one_expert": (1, (2, 12), lambda t: torch.full((t, 1), 3)),
    "two_experts_empty": (2, (2, 12), lambda t: torch.tensor([[0, 2]]).expand(t, 2)),
    "single_token": (2, (1, 1), None),
}


@pytest.fixture(params=["grouped_mm", "loop"])
def branch(request, monkeypatch):
    """Both GEMM branches on CPU: torch._grouped_mm (the CUDA branch too) and the torch.mm loop."""
    if request.param == "loop":
        monkeypatch.setitem(grouped_mm.GROUPED_MM, "cpu", ())
    else:  # every width here (H, 2I, I, r=8) is a multiple of 16 bytes in fp32 and bf16
        monkeypatch.setitem(grouped_mm.GROUPED_MM, "cpu", (torch.float32, torch.bfloat16))
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fast_path_matches_peft(scenario, dtype, branch):
    top_k, shape, choose = SCENARIOS[scenario]
    model, _ = build(dtype, top_k=top_k, train_router=scenario == "random")
    w = model.base_model.model.model.layers[0].mlp.experts.base_layer.base_layer.gate_up_proj
    assert grouped_mm.grouped_mm_ok(w, [H, 2 * I, I, 8]) == (branch == "grouped_mm")
    if choose:
        force_routing(model, choose)
    ids = torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(2))
    exact = run(copy.deepcopy(model).float(), ids) if dtype == torch.bfloat16 else None
    stock, fast = compare_paths(model, ids, dtype)
    if scenario == "random":
        assert fast[2]["base_model.model.model.layers.0.mlp.gate.weight"].abs().sum() > 0
    if exact:  # in bf16 the fast path is no less accurate than PEFT's, against the same model in fp32
        pairs = [(fast[0], stock[0], exact[0]), (fast[1], stock[1], exact[1])]
        pairs += [(fast[2][n], stock[2][n], exact[2][n]) for n in exact[2] if "experts" in n or "gate." in n]
        for f, s, x in pairs:
            if x.abs().sum() > 0:
                assert rel_err(f, x) <= 1.5 * rel_err(s, x) + 1e-2


def test_against_eager_experts_with_gelu(branch):
    model, _ = build(impl="eager", train_router=True, act="gelu")  # the experts' own act_fn is used
    force_routing(model, lambda t: torch.tensor([[1, 3]]).expand(t, 2))
    compare_paths(model, torch.randint(0, 96, (2, 8)), torch.float32)


def test_gradient_checkpointing():
    model, _ = build(train_router=True)
    model.train().base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    compare_paths(model, torch.randint(0, 96, (2, 8)), torch.float32)


def test_several_active_adapters():
    model, _ = build()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=EXPERTS))
    model.base_model.set_adapter(["default", "other"])
    randomize_b(model)
    _, fast = compare_paths(model, torch.randint(0, 96, (2, 8)), torch.float32)
    assert any(".other." in n for n in fast[2])


def test_no_full_size_expert_tensor_and_base_frozen():
    model, _ = build()
    ids = torch.randint(0, 96, (2, 12))
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    sizes = {p.numel() for p in experts}
    ptrs = {p.data_ptr() for p in experts}

    class NewTensors(TorchDispatchMode):  # every new tensor an op creates, forward and backward
        def __init__(self):
            super().__init__()
            self.hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in pytree.tree_leaves(out):  # views (transpose of a weight) alias an input: not new
                if isinstance(t, torch.Tensor) and t.numel() in sizes and t.untyped_storage().data_ptr() not in inputs:
                    self.hits.append((str(func), tuple(t.shape)))
            return out

    def trace():
        saved, fwd, bwd = [], NewTensors(), NewTensors()

        def pack(t):
            if t.numel() in sizes and t.data_ptr() not in ptrs:
                saved.append(tuple(t.shape))
            return t

        with fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids).logits.float().pow(2).mean()
        with bwd:
            loss.backward()
        return saved, fwd.hits, bwd.hits

    stock = trace()  # sanity: the detector does see PEFT's fold and its full-size weight gradient
    assert stock[0] and stock[1] and stock[2], stock
    model.zero_grad(set_to_none=True)
    enable_fast_expert_lora(model)
    assert trace() == ([], [], [])

    assert all(not p.requires_grad and p.grad is None for p in experts)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == ("lora_" in n), n  # adapters move; experts, router, the rest do not


def test_save_load_merge_disable(tmp_path):
    model, base = build()
    keys = set(get_peft_model_state_dict(model))
    model.save_pretrained(tmp_path / "stock")
    enable_fast_expert_lora(model)
    assert set(get_peft_model_state_dict(model)) == keys
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        fast = model(ids).logits
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, base(ids).logits)
        model.merge_adapter()  # merged: the fast path must not add the LoRA a second time
        torch.testing.assert_close(model(ids).logits, fast, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, fast, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "fast")
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # byte for byte what PEFT writes
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "stock" / name).read_bytes()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast").eval()  # plain PEFT
    assert not any("forward" in m.__dict__ for m in loaded.modules() if type(m).__name__ == "ParamWrapper")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fast, rtol=1e-4, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, fast, rtol=1e-4, atol=1e-5)


def test_enable_disable_counts_and_fallback(monkeypatch):
    model, _ = build()
    assert enable_fast_expert_lora(model) == 2
    assert enable_fast_expert_lora(model) == 2
    assert disable_fast_expert_lora(model) == 2
    assert disable_fast_expert_lora(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())

    dense = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    assert enable_fast_expert_lora(get_peft_model(dense, LoraConfig(target_modules=["q_proj"]))) == 0
    torch.manual_seed(0)
    attn_only = get_peft_model(MixtralForCausalLM(tiny_config()), LoraConfig(target_modules=["q_proj"]))
    assert enable_fast_expert_lora(attn_only) == 0

    # cases the fast path cannot serve fall back to PEFT's result, with a warning saying why
    ids = torch.randint(0, 96, (1, 6))
    layers = model.base_model.model.model.layers
    layers[0].mlp.experts.base_layer.base_layer.down_proj.requires_grad_(True)
    layers[1].mlp.experts.base_layer.base_layer.register_forward_pre_hook(lambda *_: None)
    with torch.no_grad():
        stock = model(ids).logits
        enable_fast_expert_lora(model)
        with pytest.warns(UserWarning) as caught:
            fallback = model(ids).logits
    assert torch.equal(fallback, stock)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "trainable" in messages[0] and "hooks" in messages[1], messages
