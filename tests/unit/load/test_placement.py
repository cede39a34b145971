"""Where eval, routing and pipeline load models: 16-bit on GPUs, float32 on the CPU, overrides.

The GPU branch is tested on a CPU machine by monkeypatching torch.cuda (it needs a real GPU
to run end to end; see docs/evaluation.md).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MOE

from finetune import modeling
from finetune.errors import UserError
from finetune.load import chain
from finetune.load.placement import Placement, choose_placement


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_no_gpu_means_float32_on_the_cpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert choose_placement() == Placement(torch.float32, None)
    assert choose_placement("auto", "auto", torch.bfloat16) == Placement(torch.float32, None)
    assert choose_placement("cpu", "bfloat16") == Placement(torch.bfloat16, None)  # asked for explicitly
    with pytest.raises(UserError, match="no CUDA GPU"):
        choose_placement("cuda")


def test_gpus_get_the_models_16_bit_dtype_spread_by_accelerate(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert choose_placement(model_dtype=torch.bfloat16) == Placement(torch.bfloat16, "auto")
    assert choose_placement(model_dtype=torch.float16) == Placement(torch.float16, "auto")
    assert choose_placement(model_dtype=torch.float32) == Placement(torch.bfloat16, "auto")  # float32 checkpoint: 16-bit anyway
    assert choose_placement("cuda:1", model_dtype=torch.bfloat16) == Placement(torch.bfloat16, {"": "cuda:1"})
    assert choose_placement("cuda", "float32") == Placement(torch.float32, "auto")
    assert choose_placement("cpu", model_dtype=torch.bfloat16) == Placement(torch.float32, None)
    with pytest.raises(UserError, match="cuda:0 to cuda:1"):
        choose_placement("cuda:2")
    with pytest.raises(UserError, match="choose auto, cpu"):
        choose_placement("tpu")


def test_gpu_without_bfloat16_falls_back_to_float16(monkeypatch):
    fake_gpus(monkeypatch, 1, bf16=False)
    assert choose_placement(model_dtype=torch.bfloat16) == Placement(torch.float16, "auto")
    assert choose_placement(model_dtype=torch.float32) == Placement(torch.float16, "auto")


def test_load_for_inference_passes_the_placement_to_from_pretrained(monkeypatch):
    """With (faked) GPUs the bundled float32 model is asked for in bfloat16 with device_map="auto"."""
    fake_gpus(monkeypatch, 2)
    seen = []
    real = modeling.load_pretrained

    def recording(section, device_map=None):
        seen.append((section.dtype, device_map))
        return real(section)  # load on the CPU: the test machine has no GPU

    monkeypatch.setattr(modeling, "load_pretrained", recording)
    chain.load_for_inference(str(TINY_MOE))
    chain.load_for_inference(str(TINY_MOE), dtype="float16", device="cuda:0")
    assert seen == [("bfloat16", "auto"), ("float16", {"": "cuda:0"})]
