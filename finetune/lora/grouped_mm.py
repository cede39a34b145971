"""Grouped GEMMs over tokens sorted by expert, and the LoRA'd grouped linear with its own backward.

    pytest tests/unit/lora/test_fast_experts.py      # equal to PEFT's stock path in loss and gradients
    python bench/expert_lora.py --tiny

`groups` = (counts (E,) tensor, offs (E,) int32 cumulative ends, bounds). bounds is a list of
(expert, start, end) for the non-empty groups on the loop path, None on the torch._grouped_mm
path. `grouped_linear` computes y = x·W_eᵀ + (s·x·A_eᵀ)·B_eᵀ per group and returns gradients for
x, A and B only (W is frozen). W is reached through a *base matmul* object, so the 16-bit fused
weight (`StackedWeight`, here) and 4-bit experts (finetune/qlora/experts.py, which dequantize one
expert at a time) share this one autograd function: one forward, one backward.
Layer: lora; imports nothing of finetune.
"""

from __future__ import annotations

import torch
from transformers.utils.import_utils import is_torch_greater_or_equal

# Where torch._grouped_mm is used, by device type and dtype; elsewhere, whenever a width is not a
# multiple of 16 bytes (the kernel's stride rule; r=2 in fp32 breaks it), and whenever a tensor's
# data does not start on a 16-byte boundary, a Python loop of torch.mm over the non-empty groups
# runs instead (see grouped_mm_ok). On CUDA, only compute capability 9.x/10.x has torch's CUTLASS
# grouped kernel, which is one launch and needs no host sync; on SM80/86/89 torch falls back to a
# kernel that copies the offsets to the host on every call (about 8 syncs per layer per step),
# worse than our loop's one sync per layer. On CPU (torch 2.13) it is a loop in C++: per GEMM it
# timed level with the Python loop at S=1024 and up to ~40% quicker for thin rank-sized GEMMs, and
# 2-9% quicker over whole training steps (hidden 128-256, 1 thread, interleaved runs), so CPU uses it too.
GROUPED_MM = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16)}


def gmm(x, w, groups):
    """Row-grouped x_g @ w[e] for each group: x (S, K), w (E, K, N) -> (S, N)."""
    _, offs, bounds = groups
    if bounds is None:
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[2])
    for e, s, t in bounds:
        torch.mm(x[s:t], w[e], out=out[s:t])
    return out


def gmm_k(a, b, groups):
    """K-grouped a[:, g] @ b[g] for each group (weight-gradient shape): a (M, S), b (S, N) -> (E, M, N)."""
    counts, offs, bounds = groups
    if bounds is None:
        # an empty group sums over nothing; zero it rather than trust every kernel to
        return torch._grouped_mm(a, b, offs=offs).masked_fill_((counts == 0).view(-1, 1, 1), 0)
    out = a.new_zeros(counts.shape[0], a.shape[0], b.shape[1])
    for e, s, t in bounds:
        torch.mm(a[:, s:t], b[s:t], out=out[e])
    return out


def expert_groups(expert_ids: torch.Tensor, num_experts: int, loop: bool):
    """`groups` for token-expert pairs already sorted by expert id.

    The counts come from a scatter-add into zeros rather than `torch.bincount`, which copies its
    maximum to the host on CUDA: the grouped_mm path then runs without any host synchronisation.
    loop=True adds the per-expert bounds (one host sync per layer, shared by forward and backward).
    """
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    bounds = None
    if loop:
        ends = offs.tolist()
        bounds = [(e, s, t) for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)) if t > s]
    return counts, offs, bounds


class StackedWeight:
    """The base matmul of a 16-bit fused expert weight: (E, out, in), or (E, in, out) when
    `transposed` (the experts module's `is_transposed`: gpt-oss, Aria)."""

    def __init__(self, weight: torch.Tensor, transposed: bool = False):
        self.weight = weight
        self.transposed = transposed

    def forward(self, x, groups):
        """x·W_eᵀ per group (W_e as (out, in)): (S, in) -> (S, out)."""
        return gmm(x, self.weight if self.transposed else self.weight.transpose(1, 2), groups)

    def input_grad(self, dy, groups):
        """dy·W_e per group: (S, out) -> (S, in)."""
        return gmm(dy, self.weight.transpose(1, 2) if self.transposed else self.weight, groups)


class _LoraGroupedLinear(torch.autograd.Function):
    """y = base(x) + (s·x·A_eᵀ)·B_eᵀ per group. Saves x and the rank-sized s·x·Aᵀ; the base weight
    is held by the base matmul (frozen, no copy), A and B are saved by reference."""

    @staticmethod
    def forward(ctx, x, base, a, b, scaling, groups):  # a (E,r,in) b (E,out,r)
        y = base.forward(x, groups)
        u = None
        if a is not None:
            u = gmm(x, a.transpose(1, 2), groups).mul_(scaling)
            y += gmm(u, b.transpose(1, 2), groups)
        ctx.save_for_backward(x, a, b, u)
        ctx.scaling, ctx.groups, ctx.base = scaling, groups, base
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, u = ctx.saved_tensors
        groups, dy = ctx.groups, dy.contiguous()
        dx = da = db = None
        g = gmm(dy, b, groups).mul_(ctx.scaling) if a is not None else None  # s·dy·B_e, (S, r)
        if ctx.needs_input_grad[0]:
            dx = ctx.base.input_grad(dy, groups)
            if g is not None:
                dx += gmm(g, a, groups)
        # g.t() and dy.t() stay transposed views (column-major): the K-grouped kernel then groups
        # along their contiguous dimension. A row-major copy would put the group boundaries inside
        # the stride, which torch._grouped_mm accepts only when every group size is a multiple of
        # 16 bytes (8 bf16 elements): never reliable for routed token counts.
        if a is not None and ctx.needs_input_grad[2]:
            da = gmm_k(g.t(), x, groups)
        if a is not None and ctx.needs_input_grad[3]:
            db = gmm_k(dy.t(), u, groups)  # dB_e = dy_eᵀ·(s·x_e·A_eᵀ), (E, out, r)
        return dx, None, da, db, None, None


def grouped_linear(x, base, lora, groups):
    """base(x) + the LoRA update per expert group; `lora` is (A, B, scaling) or None."""
    a, b, scaling = lora or (None, None, 1.0)
    return _LoraGroupedLinear.apply(x, base, a, b, scaling, groups)


def cuda_grouped_kernel(device) -> bool:
    """Whether torch's fast (CUTLASS) grouped GEMM runs on this CUDA device: compute capability
    9.x or 10.x (Hopper, Blackwell); torch < 2.9 has it for 9.x only."""
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9 or (major == 10 and is_torch_greater_or_equal("2.9", accept_dev=True))


def grouped_mm_ok(tensors, dims) -> bool:
    """torch._grouped_mm for these tensors (weights and LoRA factors of one layer) and GEMM widths?

    dims must hold every width the kernels see: gate_up in and out, down in and out (the
    intermediate size) and the ranks. The kernel needs 16-byte strides and 16-byte-aligned data
    pointers; a parameter that is a view into a flat buffer (FSDP, some loaders) can start
    anywhere. Activations are fresh allocations, aligned by the allocator.
    """
    w = tensors[0]
    if w.dtype not in GROUPED_MM.get(w.device.type, ()) or not hasattr(torch, "_grouped_mm"):
        return False
    if w.device.type == "cuda" and not cuda_grouped_kernel(w.device):
        return False
    if any(d * w.element_size() % 16 for d in dims):
        return False
    return all(t.data_ptr() % 16 == 0 for t in tensors)
