"""Eval and routing on a GPU: the bundled model loads in 16-bit there (finetune/eval/placement.py)
and gives the loss and first-choice experts it gives in float32 on the CPU.

    pytest -m gpu tests/gpu/test_gpu_placement.py       # CUDA only (the CPU branch: tests/test_eval_placement.py)
"""

from __future__ import annotations

import json

import pytest
import torch
from gpu_helpers import REPO, device_or_skip

pytestmark = pytest.mark.gpu

TINY_MOE = REPO / "model" / "tiny-moe"
TASKS = REPO / "data" / "tiny-tasks"
PLACEMENT_LOSS_TOLERANCE = 0.02  # relative, bfloat16 on the GPU vs float32 on the CPU (tests/test_pipeline.py: 0.01 on the export)
TOP1_AGREEMENT = 0.9  # first-choice experts, bfloat16 vs float32 (near ties may flip)


def test_eval_and_routing_place_the_model_in_16_bit_on_the_gpu(record_property):
    device_or_skip("eval and routing load the model in 16-bit on the GPU", cpu_ok=False)
    from finetune.eval.scores import sft_loss
    from finetune.load.chain import load_for_inference
    from finetune.routing.capture import RoutingCapture

    rows = [json.loads(line) for line in (TASKS / "sft_eval.jsonl").read_text().splitlines()[:24]]
    results = {}
    for where in ("auto", "cpu"):
        model, tok = load_for_inference(str(TINY_MOE), device=where)
        p = next(model.parameters())
        if where == "auto":
            assert p.device.type == "cuda" and p.dtype in (torch.bfloat16, torch.float16), (p.device, p.dtype)
        else:
            assert p.device.type == "cpu" and p.dtype == torch.float32
        batch = tok([r["messages"][0]["content"] for r in rows], return_tensors="pt", padding=True).to(p.device)
        with RoutingCapture(model) as cap, torch.no_grad():
            model(**batch)
        top1 = torch.stack([t[..., 0] for t in cap.last.topk]).cpu()
        results[where] = (sft_loss(model, tok, rows)["loss"], top1, cap.last.mask.cpu())
        del model
    (gpu_loss, gpu_top1, mask), (cpu_loss, cpu_top1, _) = results["auto"], results["cpu"]
    agreement = float((gpu_top1 == cpu_top1)[:, mask].float().mean())
    record_property("loss_gpu_16bit", gpu_loss)
    record_property("loss_cpu_fp32", cpu_loss)
    record_property("routing_top1_agreement", agreement)
    assert gpu_loss == pytest.approx(cpu_loss, rel=PLACEMENT_LOSS_TOLERANCE)
    assert agreement >= TOP1_AGREEMENT
