"""4-bit (NF4) experts on CUDA: quantized with bitsandbytes on the GPU, forward and backward through
finetune/qlora's dequantizing grouped linear equal the 16-bit fast path on the dequantized weights.

    pytest -m gpu tests/gpu/test_gpu_qlora.py                       # CUDA, Mixtral-8x7B's layer shapes, bfloat16
    GPU_KIT_DRY_RUN=1 pytest -m gpu tests/gpu/test_gpu_qlora.py     # CPU, tiny shapes, float32
"""

from __future__ import annotations

import copy

import pytest
import torch
from gpu_helpers import (
    device_or_skip,
    grouped,
    ids,
    loss_and_grads,
    mixtral,
    rel,
    shapes,
    with_lora,
)

from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.qlora import experts as nf4_experts
from finetune.qlora import nf4

pytestmark = pytest.mark.gpu

# The same weights and the same LoRA factors; only the GEMMs differ (per-expert mm on freshly
# dequantized weights vs one grouped GEMM): float32 agrees to rounding, bfloat16 to its precision.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def test_nf4_experts_forward_and_backward(record_property):
    device = device_or_skip("NF4 experts quantized and run forward and backward on the GPU")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (bench/gpu_wheels.sh carries it)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    s = dict(shapes(device), batch=1)
    base = mixtral(s, device, dtype)
    quant = copy.deepcopy(base)
    assert nf4_experts.quantize_experts(quant, dtype) == 1
    experts = quant.model.layers[0].mlp.experts
    assert experts.gate_up_proj_nf4_packed.device.type == device and experts.gate_up_proj_nf4_packed.dtype == torch.uint8
    for name in ("gate_up_proj", "down_proj"):
        getattr(base.model.layers[0].mlp.experts, name).data.copy_(nf4.dequantized_weight(experts, name))
    quant, ref = with_lora(quant, s["rank"]), with_lora(base, s["rank"])
    assert enable_fast_expert_lora(quant) == 1 and enable_fast_expert_lora(ref) == 1
    x = ids(s, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    q_loss, q_grads = loss_and_grads(quant, x)
    if device == "cuda":
        record_property("peak_gib_nf4_step", torch.cuda.max_memory_allocated() / 2**30)
    r_loss, r_grads = loss_and_grads(ref, x)
    errors = {"loss": rel(q_loss, r_loss)}
    gq, gr = grouped(q_grads), grouped(r_grads)
    errors.update({k: rel(gq[k], gr[k]) for k in gr})
    for k, v in errors.items():
        record_property(f"rel_err_{k}", v)
    assert all(g.abs().sum() > 0 for g in gq.values())
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"NF4 path vs 16-bit fast path on the dequantized weights, relative error over {TOLERANCE[dtype]}: {bad}"
