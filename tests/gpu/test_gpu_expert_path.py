"""The fast expert path (finetune/lora/fast_experts.py) on CUDA: same loss and gradients as PEFT's stock
path in bfloat16 at Mixtral-8x7B's layer shapes, torch's grouped kernel taken, no host sync.

    pytest -m gpu tests/gpu/test_gpu_expert_path.py                       # CUDA
    GPU_KIT_DRY_RUN=1 pytest -m gpu tests/gpu/test_gpu_expert_path.py     # CPU, tiny shapes
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import (
    cuda_only,
    device_or_skip,
    grouped,
    ids,
    loss_and_grads,
    mixtral,
    rel,
    shapes,
    with_lora,
)

from finetune.lora import fast_experts, grouped_mm

pytestmark = pytest.mark.gpu

# bfloat16 against a float32 reference: relative errors land between 1e-3 and 1e-2 (8-bit
# mantissa, long sums). The fast path must be at least as close to float32 as the stock path,
# with slack for rounding: at most 2x the stock path's error or FLOOR, whichever is larger,
# and never above CEILING.
FLOOR, CEILING = 1e-2, 1e-1


def test_fast_path_matches_stock_peft_in_bf16(record_property):
    device = device_or_skip("the fast expert path vs PEFT's stock path in bfloat16 at Mixtral-like shapes")
    s = shapes(device)
    model = with_lora(mixtral(s, device, torch.float32), s["rank"])
    x = ids(s, device)
    base = model.get_base_model()
    base.set_experts_implementation("eager")  # the reference: stock PEFT, float32, a plain loop over experts
    ref_loss, ref = loss_and_grads(model, x)
    model.to(torch.bfloat16)
    base.set_experts_implementation("grouped_mm")  # stock PEFT as users run it: W + s·BA folded, grouped_mm
    stock_loss, stock = loss_and_grads(model, x)
    assert fast_experts.enable_fast_expert_lora(model) == 1
    fast_loss, fast = loss_and_grads(model, x)

    errors = {"loss": (rel(fast_loss, ref_loss), rel(stock_loss, ref_loss))}
    ref_g, stock_g, fast_g = grouped(ref), grouped(stock), grouped(fast)
    for k in ref_g:
        errors[k] = (rel(fast_g[k], ref_g[k]), rel(stock_g[k], ref_g[k]))
    for k, (f, st) in errors.items():
        record_property(f"rel_err_{k}_fast", f)
        record_property(f"rel_err_{k}_stock", st)
    bad = {k: v for k, v in errors.items() if not (v[0] <= max(2 * v[1], FLOOR) and v[0] < CEILING)}
    assert not bad, f"relative error vs float32 (fast, stock) beyond max(2x stock, {FLOOR}) or {CEILING}: {bad}"


def test_fast_path_takes_the_grouped_kernel(monkeypatch):
    device = device_or_skip("torch._grouped_mm in the fast path on the GPU")
    if device == "cuda" and not grouped_mm.cuda_grouped_kernel(torch.device("cuda")):
        pytest.skip(f"{torch.cuda.get_device_name()}: torch's grouped kernel needs compute capability 9.x/10.x; the loop runs")
    s = dict(shapes(device), batch=1, seq=128)
    layers = 2
    model = with_lora(mixtral(s, device, torch.bfloat16, layers=layers), s["rank"])
    assert fast_experts.enable_fast_expert_lora(model) == layers
    calls, decisions = [], []
    real_mm, real_ok = torch._grouped_mm, fast_experts.grouped_mm_ok
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    monkeypatch.setattr(fast_experts, "grouped_mm_ok", lambda *a: decisions.append(real_ok(*a)) or decisions[-1])
    loss_and_grads(model, ids(s, device))
    assert decisions == [True] * layers
    # per layer and projection: forward x·W, x·A, u·B (3); backward dy·B, dy·W, g·A, dA, dB (5)
    assert len(calls) == layers * 2 * (3 + 5)


def test_fast_path_has_no_host_sync(record_property):
    device = device_or_skip("no host synchronisation in the fast experts' forward and backward")
    cuda_only("torch.cuda.set_sync_debug_mode('error') around the fast experts' forward and backward")
    if not grouped_mm.cuda_grouped_kernel(torch.device("cuda")):
        pytest.skip("the per-expert loop (GPUs before compute capability 9.x) syncs once per layer by design")
    s = dict(shapes(device), batch=1, seq=256)
    model = with_lora(mixtral(s, device, torch.bfloat16), s["rank"])
    assert fast_experts.enable_fast_expert_lora(model) == 1
    wrapper = model.get_base_model().model.layers[0].mlp.experts  # the outermost PEFT wrapper: what the block calls
    tokens = s["batch"] * s["seq"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, s["hidden"], device=device, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    logits = torch.randn(tokens, s["experts"], device=device, generator=gen)
    weights, index = torch.topk(logits.softmax(-1), s["top_k"], dim=-1)

    def step():
        wrapper(hidden, index, weights).float().square().mean().backward()

    step()  # warm-up: lazy initialisation (cuBLAS handles, kernels) stays out of the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the check is live: bincount must trip it
            torch.bincount(index.flatten(), minlength=s["experts"])
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    record_property("tokens", tokens)
