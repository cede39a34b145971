"""When finetune/lora/fast_experts.py may take torch._grouped_mm: widths, CUDA capability, alignment.

Run: `pytest tests/unit/lora/test_grouped_mm.py` (CPU, a few seconds). On CPU the grouped path is
taken for float32 and bfloat16, so the width and alignment guards are exercised for real; the
CUDA capability rule is checked by monkeypatching torch.cuda.get_device_capability.
"""

from __future__ import annotations

import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_fast_experts import EXPERTS, compare_paths, randomize_b
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.lora import grouped_mm


def build(intermediate: int, dtype):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    base = MixtralForCausalLM(config).to(dtype).eval()
    base.set_experts_implementation("eager")  # the stock path's reference: torch.mm per expert, any width
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize_b(model)
    return model


@pytest.fixture
def grouped_calls(monkeypatch):
    """Counts calls of torch._grouped_mm (still running the real kernel)."""
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    monkeypatch.setitem(grouped_mm.GROUPED_MM, "cpu", (torch.float32, torch.bfloat16))
    return calls


@pytest.mark.parametrize("intermediate, grouped", [(44, False), (48, True)], ids=["I%8==4", "I%8==0"])
def test_down_projection_width_is_checked(intermediate, grouped, grouped_calls):
    """bf16 with I % 8 == 4: the down projection's input (I·2 bytes) is not a multiple of 16, so
    the loop runs, and matches PEFT; with I % 8 == 0 the grouped kernel runs (the control)."""
    model = build(intermediate, torch.bfloat16)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    compare_paths(model, ids, torch.bfloat16)
    assert bool(grouped_calls) == grouped


def test_misaligned_parameter_takes_the_loop(grouped_calls):
    """An expert weight that is a view 4 bytes into a flat buffer: no grouped GEMM, same results."""
    model = build(48, torch.float32)
    for name, param in model.named_parameters():
        if name.endswith("experts.base_layer.base_layer.gate_up_proj"):
            flat = torch.zeros(param.numel() + 1)
            flat[1:].copy_(param.detach().flatten())
            param.data = flat[1:].view_as(param)
            assert param.data_ptr() % 16 == 4
    misaligned = [p for n, p in model.named_parameters() if n.endswith("gate_up_proj") and p.data_ptr() % 16]
    assert len(misaligned) == 2  # both layers
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    compare_paths(model, ids, torch.float32)
    assert grouped_calls == []
    aligned = torch.zeros(4, 96, 32)
    assert grouped_mm.grouped_mm_ok([aligned], [96, 32])
    assert not grouped_mm.grouped_mm_ok([aligned, misaligned[0]], [96, 32])


@pytest.mark.parametrize("capability, fast", [((8, 0), False), ((8, 6), False), ((8, 9), False), ((9, 0), True),
                                              ((10, 0), True), ((12, 0), False), ((7, 5), False)])
def test_cuda_grouped_kernel_only_on_sm90_and_sm100(capability, fast, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grouped_mm.cuda_grouped_kernel("cuda:0") is fast
    # and _grouped_mm_ok follows it for a CUDA bf16 weight (a stand-in: this machine has no GPU)
    fake = types.SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda", 0), element_size=lambda: 2,
                                 data_ptr=lambda: 0)
    assert grouped_mm.grouped_mm_ok([fake], [64, 32, 16]) is fast


def test_width_rule_covers_every_dim():
    w = torch.zeros(2, 8, 8, dtype=torch.bfloat16)
    assert grouped_mm.grouped_mm_ok([w], [16, 8, 24])
    assert not grouped_mm.grouped_mm_ok([w], [16, 8, 12])  # 12 bf16 = 24 bytes
