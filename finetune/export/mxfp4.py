"""Exporting onto a base checkpoint that ships its experts in MXFP4 (gpt-oss): written in 16-bit.

    finetune export RUN --output DIR [--dtype bfloat16]     # the merge reads the base through here

gpt-oss checkpoints store each fused expert weight `W` (E, in, out) as `W_blocks` (E, out, in/32,
16: two FP4 codes a byte) and `W_scales` (E, out, in/32: a power-of-two exponent + 127 per 32
values). LoRA trained on the weights these decode to (finetune.modeling.dequantized), so the
merge decodes each pair with transformers' own function (`convert_moe_packed_tensors`, what its
Mxfp4Config(dequantize=True) load runs) and writes `W` in the export dtype: the export is a plain
16-bit checkpoint (its config has no quantization_config), which the manifest and model card say.
Re-quantizing the merged experts to MXFP4 would need transformers' Triton kernels; not done.
Layer: export; imports nothing of finetune.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

BLOCKS, SCALES = "_blocks", "_scales"


def decode_specs(specs: dict) -> dict[str, tuple]:
    """Replace each `W_blocks`/`W_scales` pair of `specs` (key -> (file, shape, dtype), from the
    headers) by the tensor `W` it decodes to, in place; returns W -> (blocks (file, key), scales
    (file, key)) for `read`. The decoded tensor's spec takes the blocks' file."""
    sources = {}
    for key in [k for k in specs if k.endswith(BLOCKS)]:
        name = key[: -len(BLOCKS)]
        if name + SCALES not in specs or name in specs:
            continue
        file, shape, _ = specs.pop(key)
        scales_file, _, _ = specs.pop(name + SCALES)
        *prefix, rows, groups, half = shape  # (E, out, in/32, 16) -> (E, in, out)
        specs[name] = (file, (*prefix, groups * half * 2, rows), torch.bfloat16)
        sources[name] = ((file, key), (scales_file, name + SCALES))
    return sources


def read(name: str, sources: dict) -> torch.Tensor:
    """The decoded (E, in, out) float32 tensor of one MXFP4 pair (exact: FP4 codes times powers of two)."""
    (blocks_file, blocks_key), (scales_file, scales_key) = sources[name]
    with safe_open(str(blocks_file), "pt") as f:
        blocks = f.get_tensor(blocks_key)
    with safe_open(str(scales_file), "pt") as f:
        scales = f.get_tensor(scales_key)
    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def note(sources: dict, dtype: torch.dtype, base_dir: Path) -> str | None:
    """What the export says about it (manifest, log), or None for a base without MXFP4 tensors."""
    if not sources:
        return None
    return (f"the base checkpoint {base_dir} ships {len(sources)} expert weights in MXFP4; the export writes them "
            f"decoded and merged in {str(dtype).removeprefix('torch.')} (no MXFP4 tensors, no quantization_config)")
