"""Shared pieces of the GPU tests in tests/gpu/: which device they run on, at which shapes, and the models.

    pytest -m gpu                                  # on a CUDA machine (bench/gpu_check.sh runs this)
    GPU_KIT_DRY_RUN=1 pytest -m gpu tests/gpu      # CPU, tiny shapes (bench/gpu_check.sh --dry-run)

On CUDA the tests run at Mixtral-like shapes in bfloat16. Without CUDA every test skips, saying
what it needs, unless GPU_KIT_DRY_RUN=1: then what can run on a CPU runs at tiny shapes (so a
renamed function or a broken import fails in CI), and each CUDA-only assertion skips by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DRY_RUN = os.environ.get("GPU_KIT_DRY_RUN") == "1"
CUDA = torch.cuda.is_available()
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# Mixtral-8x7B's layer shapes (one layer, a short vocabulary: the LM head is not what is tested)
MIXTRAL = dict(hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab=1024, batch=2, seq=512, rank=16)
# widths that keep torch._grouped_mm's 16-byte rule in bfloat16 and float32, so the CPU takes the grouped kernel too
TINY = dict(hidden=64, intermediate=128, experts=4, top_k=2, heads=4, kv_heads=2, vocab=128, batch=2, seq=32, rank=8)


def device_or_skip(what: str, cpu_ok: bool = True) -> str:
    """"cuda" when there is a GPU; "cpu" in a dry run for tests that can run there; else skip naming `what`."""
    if CUDA:
        return "cuda"
    if DRY_RUN and cpu_ok:
        return "cpu"
    pytest.skip(f"needs CUDA: {what}" + (" (CUDA-only, skipped in the dry run)" if DRY_RUN else ""))


def cuda_only(what: str) -> None:
    """Skip the rest of a test (the CUDA-only assertion `what`) when there is no GPU."""
    if not CUDA:
        pytest.skip(f"CUDA-only assertion skipped without a GPU: {what}")


def shapes(device: str) -> dict:
    return MIXTRAL if device == "cuda" else TINY


def mixtral(s: dict, device: str, dtype: torch.dtype, layers: int = 1, seed: int = 0):
    """A random Mixtral-architecture model of shapes `s` (router aux loss off: it is not what is compared)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                           num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                           num_local_experts=s["experts"], num_experts_per_tok=s["top_k"],
                           max_position_embeddings=max(s["seq"], 64), router_aux_loss_coef=0.0)
    torch.manual_seed(seed)
    with torch.device(device):
        return MixtralForCausalLM._from_config(config, dtype=dtype)


def with_lora(model, rank: int, seed: int = 1):
    """LoRA on attention and experts, with B drawn at random: PEFT inits B to zero, which would hide
    any error in the B·A product."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, target_parameters=EXPERTS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def ids(s: dict, device: str, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen).to(device)


def loss_and_grads(model, input_ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward; the loss and every trainable parameter's gradient, in float64 on the CPU."""
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach().double().cpu(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN for a NaN anywhere, so it never passes a bound)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grouped(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients concatenated per group: attention LoRA, expert LoRA A, expert LoRA B."""
    keys = {"attention": lambda n: any(f".{t}." in n for t in ATTENTION),
            "experts_A": lambda n: "experts" in n and "lora_A" in n, "experts_B": lambda n: "experts" in n and "lora_B" in n}
    return {k: torch.cat([g.flatten() for n, g in sorted(grads.items()) if f(n)]) for k, f in keys.items()}
