"""Slow: loading in 4-bit holds the 4-bit model plus one layer's experts in 16-bit, not the model.

    pytest -m slow tests/e2e/test_qlora_load_memory.py -s   (prints the measured figures)

A random Mixtral-architecture checkpoint (32 decoder layers, bfloat16, 1.4 GB in 100 MB shards,
Mixtral's per-expert keys) is loaded through finetune.qlora.loading.load_quantized, and, as the
control, through transformers' stock 4-bit load with the experts quantized afterwards; each in
its own process (bench/qlora_memory.py `measure`), which samples its anonymous memory every 2 ms
(VmHWM would also count the mmap-ed checkpoint's pages, which the kernel can drop at will).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import qlora_memory  # noqa: E402

GiB = 2**30


@pytest.mark.slow
def test_4bit_load_is_bounded(tmp_path):
    path = qlora_memory.make_random_mixtral(tmp_path / "ckpt", layers=32, max_shard_size="100MB", hidden_size=512,
                                            intermediate_size=1792, vocab_size=8000)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert len(list(path.glob("*.safetensors"))) >= 10
    streamed = qlora_memory.in_subprocess(str(path), "while", "bfloat16")
    stock = qlora_memory.in_subprocess(str(path), "after", "bfloat16")
    held = {name: r["peak_rss_anon"] - r["baseline_rss_anon"] for name, r in (("streamed", streamed), ("stock", stock))}
    four_bit = sum(streamed["tensors"].values())
    print(f"\ncheckpoint {size / GiB:.2f} GiB; 4-bit tensors {four_bit / GiB:.3f} GiB; peak anonymous memory of the load "
          f"above the process baseline: quantized while loading {held['streamed'] / GiB:.3f} GiB "
          f"({held['streamed'] / size:.0%} of the checkpoint, {streamed['seconds']:.0f} s), stock load then quantize "
          f"{held['stock'] / GiB:.3f} GiB ({held['stock'] / size:.0%}, {stock['seconds']:.0f} s)")
    assert streamed["tensors"] == stock["tensors"]  # the same 4-bit model either way
    assert four_bit < 0.4 * size
    assert held["stock"] > 0.9 * size  # control: the sampler does see a load that holds the 16-bit model
    assert held["streamed"] < 0.5 * size
