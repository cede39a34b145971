"""Turn a saved gpt-oss checkpoint into one that ships its experts in MXFP4, as the released gpt-oss
checkpoints do, with random FP4 codes and exponents (for tests and the 4-bit load benchmark).

    python bench/qlora_memory.py --bounded-load --family gpt_oss_mxfp4    # uses this
    pytest tests/e2e/test_mxfp4.py                                        # uses this

transformers 5.25 cannot write MXFP4 on a CPU offline: its quantizer (`Mxfp4Quantize`) calls
`triton_kernels_hub`, which `replace_with_mxfp4_linear` fetches from the hub
(`kernels-community/gpt-oss-triton-kernels`), and it needs Triton >= 3.5. So the tensors are
written here from the format (the layout transformers' decoder reads, integrations/mxfp4.py): for a
fused expert weight W (E, in, out), `W_blocks` uint8 (E, out, in/32, 16), two FP4 codes a byte (the
low nibble the even element), each an index into FP4 below, and `W_scales` uint8 (E, out, in/32),
the power-of-two exponent + 127 of each 32 values. Codes and exponents are drawn at random, so the
decoded weight is known exactly without a quantizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def decode(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """The (E, in, out) weight that codes (E, out, in/32, 32) and exponents (E, out, in/32) stand for."""
    e, out, groups, _ = codes.shape
    rows = FP4[codes.long()] * torch.exp2(exponents.float() - 127).unsqueeze(-1)
    return rows.reshape(e, out, groups * 32).transpose(1, 2).contiguous()


def to_mxfp4(directory: Path, seed: int = 1, keep_expected: bool = True) -> dict[str, torch.Tensor]:
    """Replace every fused expert weight in the checkpoint's shards by random MXFP4 blocks and scales
    and mark the config `quant_method: mxfp4`; returns key -> the exact decoded weight (if kept)."""
    g = torch.Generator().manual_seed(seed)
    expected = {}
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for shard in sorted(directory.glob("*.safetensors")):
        state = load_file(shard)
        keys = [k for k in state if k.endswith(EXPERTS)]
        if not keys:
            continue
        for key in keys:
            e, inp, out = state.pop(key).shape
            codes = torch.randint(0, 16, (e, out, inp // 32, 32), generator=g, dtype=torch.uint8)
            exponents = torch.randint(122, 129, (e, out, inp // 32), generator=g, dtype=torch.uint8)
            if keep_expected:
                expected[key] = decode(codes, exponents)
            state[key + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
            state[key + "_scales"] = exponents
            if index is not None:
                del index["weight_map"][key]
                index["weight_map"].update({key + "_blocks": shard.name, key + "_scales": shard.name})
        save_file(state, shard, metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return expected
