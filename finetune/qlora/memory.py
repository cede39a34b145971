"""Bytes a (4-bit) model's tensors hold, by kind: what bench/qlora_memory.py reports.

    python bench/qlora_memory.py
Layer: qlora; imports nothing of finetune.
"""

from __future__ import annotations


def resident_bytes(model) -> dict[str, int]:
    """Bytes the model's tensors hold, by kind: 4-bit packed weights with their quantization
    state, and 16-bit/32-bit tensors (embeddings, norms, router, lm_head). Placeholders count 0."""
    out = {"nf4_experts": 0, "linear4bit": 0, "other": 0}
    seen = set()
    for module in model.modules():
        for key, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if key.endswith(("gate_up_proj", "down_proj", "up_proj")) and t.ndim == 3 and t.stride() == (0, 0, 0):
                continue  # the NaN placeholder: one element
            if "_nf4_" in key or key.startswith("nf4_"):
                out["nf4_experts"] += t.nbytes
            elif type(t).__name__ == "Params4bit":
                qs = t.quant_state
                out["linear4bit"] += t.nbytes + qs.absmax.nbytes + qs.code.nbytes + (
                    qs.state2.absmax.nbytes + qs.state2.code.nbytes + qs.offset.nbytes if qs.nested else 0)
            else:
                out["other"] += t.nbytes
    return out


