"""NF4 storage of fused expert weights: quantize per expert, dequantize one expert just in time.

    pytest tests/unit/qlora/test_nf4_experts.py

The same quantization bitsandbytes' `Linear4bit` applies to a weight (`quantize_4bit`, NF4, block
size 64, absmax double-quantized), once per expert matrix of a fused (E, out, in) weight, so the
16-bit working set is one expert matrix at a time (finetune/qlora/experts.py).
Layer: qlora; imports errors only (bitsandbytes, an optional extra, inside functions).
"""

from __future__ import annotations

import torch

from finetune.errors import UserError

BLOCKSIZE = 64  # bitsandbytes' Linear4bit / Params4bit default, used for the experts too
QUANT_TYPE = "nf4"


def require_bitsandbytes(where: str = "model.quantization"):
    """The bitsandbytes module, or a UserError saying how to install it."""
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as bnbf  # optional extra (finetune[qlora])
    except ImportError as exc:
        raise UserError(f"{where}: nf4 needs bitsandbytes, which is not installed ({exc}); "
                        "install it with `pip install 'finetune[qlora]'` (or `pip install bitsandbytes`)") from None
    return bnbf


@torch.no_grad()
def quantize_per_expert(w: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], int]:
    """NF4 buffers of a fused (E, out, in) weight, expert by expert, and the nested block size.
    Buffers: `{name}_nf4_{packed,absmax,absmax2,offset}` stacked over experts, and the two codebooks."""
    bnbf = require_bitsandbytes()
    packed, absmax, absmax2, offset = [], [], [], []
    for e in range(w.shape[0]):
        q, st = bnbf.quantize_4bit(w[e].contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type=QUANT_TYPE)
        packed.append(q.view(-1))
        absmax.append(st.absmax)
        absmax2.append(st.state2.absmax)
        offset.append(st.offset.reshape(()))
    buffers = {"nf4_code": st.code, "nf4_absmax_code": st.state2.code}
    for key, parts in (("packed", packed), ("absmax", absmax), ("absmax2", absmax2), ("offset", offset)):
        buffers[f"{name}_nf4_{key}"] = torch.stack(parts)
    return buffers, st.state2.blocksize


def dequantize_expert(experts, name: str, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expert e's (out, in) matrix of `name`, dequantized to `dtype` (default: the compute dtype)."""
    from bitsandbytes.functional import (  # optional extra (finetune[qlora])
        QuantState,
        dequantize_4bit,
    )

    info = experts.nf4["weights"][name]
    buf = lambda key: getattr(experts, f"{name}_nf4_{key}")[e]  # noqa: E731
    state2 = QuantState(absmax=buf("absmax2"), code=experts.nf4_absmax_code, blocksize=info["nested_blocksize"],
                        dtype=torch.float32)
    state = QuantState(absmax=buf("absmax"), shape=torch.Size(info["shape"]), code=experts.nf4_code, blocksize=BLOCKSIZE,
                       quant_type=QUANT_TYPE, dtype=dtype or experts.nf4["dtype"], offset=buf("offset"), state2=state2)
    return dequantize_4bit(buf("packed"), state)


def dequantized_weight(experts, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole (E, out, in) weight dequantized (for tests and checks; training never builds it)."""
    n = getattr(experts, name).shape[0]
    return torch.stack([dequantize_expert(experts, name, e, dtype) for e in range(n)])


