"""Slow: a 4-bit load of an MXFP4 gpt-oss checkpoint decodes and quantizes one fused weight at a
time, instead of decoding the whole model to 16-bit first.

    pytest -m slow tests/e2e/test_mxfp4_load_memory.py -s   (prints the measured figures; ~8 min on 2 shared cores)

A random gpt-oss-architecture checkpoint (16 layers, hidden 1024, 8 experts of 2048: 0.91B
parameters, experts in MXFP4 with random codes, bench/mxfp4_checkpoint.py) is loaded through
finetune.qlora.loading.load_quantized and, as the control, through transformers'
`Mxfp4Config(dequantize=True)` 16-bit load with the experts quantized afterwards; each in its own
process (bench/qlora_memory.py `measure`), which samples its anonymous memory every 2 ms.
Measured 2026-12-07 (bench/RESULTS-fastpath.md): 1.18-1.26 GiB against 1.88-2.02 GiB above the
process baseline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import qlora_memory  # the measuring code, shared with the bench

GiB = 2**30


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FINETUNE_SLOW_ALL"), reason="7 minutes on 2 cores, over issue 20's CI budget: "
                    "FINETUNE_SLOW_ALL=1 runs it (passed in 426 s, bench/RESULTS.md)")
def test_mxfp4_4bit_load_is_bounded(tmp_path):
    path = qlora_memory.make_random_gpt_oss_mxfp4(tmp_path / "ckpt", layers=16, max_shard_size="200MB")
    decoded_experts = 2 * qlora_memory.params_of(str(path))["experts"]  # bytes of the experts in bfloat16
    streamed = qlora_memory.in_subprocess(str(path), "while", "bfloat16")
    stock = qlora_memory.in_subprocess(str(path), "after", "bfloat16")
    held = {name: r["peak_rss_anon"] - r["baseline_rss_anon"] for name, r in (("streamed", streamed), ("stock", stock))}
    print(f"\nexperts decoded to bfloat16 {decoded_experts / GiB:.2f} GiB; peak anonymous memory above the baseline: "
          f"decoded and quantized per weight {held['streamed'] / GiB:.3f} GiB ({streamed['seconds']:.0f} s), "
          f"decoded whole then quantized {held['stock'] / GiB:.3f} GiB ({stock['seconds']:.0f} s)")
    assert streamed["tensors"]["nf4_experts"] == stock["tensors"]["nf4_experts"]  # the same NF4 experts either way
    assert held["stock"] > 0.9 * decoded_experts  # control: the sampler does see the whole decoded model
    assert held["streamed"] < 0.75 * held["stock"]
