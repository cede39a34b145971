"""Known GPUs, `--gpu-memory` sizes, and step time from FLOPs, for `finetune plan`.

    finetune plan recipes/mixtral-8x7b/sft.yaml --gpu h100-80gb --gpus 8
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int
    """Bytes, as `nvidia-smi` reports the card's total (MiB x 2**20)."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak from the vendor's data sheet (no sparsity)."""


# Memory: the MiB totals nvidia-smi prints for these cards; TFLOP/s: vendor data sheets, dense.
GPUS = {g.name: g for g in (
    Gpu("h100-80gb", 81559 * 2**20, 989.0),    # H100 SXM5
    Gpu("h100-pcie", 81559 * 2**20, 756.0),
    Gpu("h200", 143771 * 2**20, 989.0),
    Gpu("b200", 183359 * 2**20, 2250.0),
    Gpu("a100-40gb", 40960 * 2**20, 312.0),
    Gpu("a100-80gb", 81920 * 2**20, 312.0),
    Gpu("l40s", 46068 * 2**20, 362.0),
    Gpu("a6000", 49140 * 2**20, 154.8),         # RTX A6000
    Gpu("rtx4090", 24564 * 2**20, 165.2),
    Gpu("a10g", 23028 * 2**20, 70.0),
)}

# No GPU step of this project has been timed yet, so the model FLOP utilisation is assumed, and
# every figure derived from it says so. 35%: a middle value for LoRA training of 16-bit MoE models
# with grouped expert GEMMs; not measured.
ASSUMED_MFU = 0.35

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """`80GiB`, `48GB`, `81559MiB` -> bytes (a bare number is GiB)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else ""
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--gpu-memory {text!r}: not a size; write a number and a unit, e.g. 80GiB, 48GB, 24564MiB")
    return int(float(m.group(1)) * (UNITS[unit] if unit else GIB))


def pick_gpu(name: str | None, memory: str | None) -> Gpu:
    if memory is not None:
        size = parse_memory(memory)
        base = GPUS.get(name) if name else None
        if name and base is None:
            raise UserError(unknown_gpu(name))
        return Gpu(f"{base.name if base else 'gpu'} ({size / GIB:.1f} GiB)", size, base.bf16_tflops if base else 0.0)
    if name is None:
        name = "h100-80gb"
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise UserError(unknown_gpu(name))
    return gpu


def unknown_gpu(name: str) -> str:
    known = ", ".join(GPUS)
    return f"--gpu {name}: unknown GPU; known: {known}; for any other card give its memory with --gpu-memory (e.g. 48GiB)"


def flops_per_token(active_params: int, layers: int, seq: int, attn_width: int) -> float:
    """Useful FLOPs of one trained token with LoRA (frozen base): forward 2P, backward to the
    inputs 2P (no weight gradients of the base), plus causal attention, 6 x seq x width per layer."""
    return 4.0 * active_params + 6.0 * seq * attn_width * layers
