"""Fast LoRA on fused MoE expert weights: apply the low-rank update to activations, not weights.

PEFT's `target_parameters` path (peft.tuners.lora.layer.ParamWrapper) folds W + s·B·A into a
full (E, out, in) weight on every forward, so autograd also builds a full-size weight gradient.
Here each expert group of routed tokens computes x·W_eᵀ + s·((x·A_eᵀ)·B_eᵀ) instead: the base
GEMM plus two thin GEMMs through the rank, for gate_up and for down. A custom autograd Function
returns gradients for x, A and B only; nothing of the expert-weight size is built forward or back.

Seam: the outermost PEFT ParamWrapper around each experts module gets an instance-level
`forward` (`del` restores PEFT's). Registering a function on transformers'
`ALL_EXPERTS_FUNCTIONS` was the other candidate, but that dispatch is chosen by one config
string shared by every layer (and saved with the model), the function only sees the bare
experts module, and PEFT's wrapper would still fold W + BA before calling it. So the wrapper is
the seam; the dispatch below follows transformers' `grouped_mm_experts_forward` contract
(`_apply_gate`, `act_fn`, routing-weight sum in fp32) so outputs match the stock path. Adapter
disabled or merged: PEFT's own forward runs, so the base path is exactly the stock one. Parameter
names and the state dict are untouched, so saved adapters load with plain PEFT.

Used by `finetune sft|dpo` when a recipe has `lora.expert_path: fast` (the default).
Tests: `pytest tests/test_expert_lora.py`. Benchmark: `python bench/expert_lora.py --tiny`.
"""

from __future__ import annotations

import types
import warnings

import torch
from peft.tuners.lora.layer import ParamWrapper
from transformers.utils.import_utils import is_torch_greater_or_equal

# Where torch._grouped_mm is used, by device type and dtype; elsewhere, whenever a width is not a
# multiple of 16 bytes (the kernel's stride rule; r=2 in fp32 breaks it), and whenever a tensor's
# data does not start on a 16-byte boundary, a Python loop of torch.mm over the non-empty groups
# runs instead (see _grouped_mm_ok). On CUDA, only compute capability 9.x/10.x has torch's CUTLASS
# grouped kernel, which is one launch and needs no host sync; on SM80/86/89 torch falls back to a
# kernel that copies the offsets to the host on every call (about 8 syncs per layer per step),
# worse than our loop's one sync per layer. On CPU (torch 2.13) it is a loop in C++: per GEMM it timed level with the
# Python loop at S=1024 and up to ~40% quicker for thin rank-sized GEMMs, and 2-9% quicker over
# whole training steps (hidden 128-256, 1 thread, interleaved runs), so CPU uses it too.
GROUPED_MM = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16)}
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(f"fast expert LoRA: {msg}; using PEFT's stock path for it", stacklevel=3)


# ---- grouped GEMMs over tokens sorted by expert -------------------------------------------
# `groups` = (counts (E,) tensor, offs (E,) int32 cumulative ends, bounds). bounds is a list of
# (expert, start, end) for non-empty groups on the loop path, None on the grouped_mm path.


def _gmm(x, w, groups):
    """Row-grouped x_g @ w[e] for each group: x (S, K), w (E, K, N) -> (S, N)."""
    _, offs, bounds = groups
    if bounds is None:
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[2])
    for e, s, t in bounds:
        torch.mm(x[s:t], w[e], out=out[s:t])
    return out


def _gmm_k(a, b, groups):
    """K-grouped a[:, g] @ b[g] for each group (weight-gradient shape): a (M, S), b (S, N) -> (E, M, N)."""
    counts, offs, bounds = groups
    if bounds is None:
        # an empty group sums over nothing; zero it rather than trust every kernel to
        return torch._grouped_mm(a, b, offs=offs).masked_fill_((counts == 0).view(-1, 1, 1), 0)
    out = a.new_zeros(counts.shape[0], a.shape[0], b.shape[1])
    for e, s, t in bounds:
        torch.mm(a[:, s:t], b[s:t], out=out[e])
    return out


class _LoraGroupedLinear(torch.autograd.Function):
    """y = x·W_eᵀ + (s·x·A_eᵀ)·B_eᵀ per group. W frozen: backward returns grads for x, A, B only.

    Saves x and the rank-sized s·x·Aᵀ; W, A, B are saved by reference (no copies).
    """

    @staticmethod
    def forward(ctx, x, w, a, b, scaling, groups):  # w (E,out,in) a (E,r,in) b (E,out,r)
        y = _gmm(x, w.transpose(1, 2), groups)
        u = None
        if a is not None:
            u = _gmm(x, a.transpose(1, 2), groups).mul_(scaling)
            y += _gmm(u, b.transpose(1, 2), groups)
        ctx.save_for_backward(x, w, a, b, u)
        ctx.scaling, ctx.groups = scaling, groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, u = ctx.saved_tensors
        groups, dy = ctx.groups, dy.contiguous()
        dx = da = db = None
        g = _gmm(dy, b, groups).mul_(ctx.scaling) if a is not None else None  # s·dy·B_e, (S, r)
        if ctx.needs_input_grad[0]:
            dx = _gmm(dy, w, groups)
            if g is not None:
                dx += _gmm(g, a, groups)
        # g.t() and dy.t() stay transposed views (column-major): the K-grouped kernel then groups
        # along their contiguous dimension. A row-major copy would put the group boundaries inside
        # the stride, which torch._grouped_mm accepts only when every group size is a multiple of
        # 16 bytes (8 bf16 elements): never reliable for routed token counts.
        if a is not None and ctx.needs_input_grad[2]:
            da = _gmm_k(g.t(), x, groups)
        if a is not None and ctx.needs_input_grad[3]:
            db = _gmm_k(dy.t(), u, groups)  # dB_e = dy_eᵀ·(s·x_e·A_eᵀ), (E, out, r)
        return dx, None, da, db, None, None


# ---- one MoE layer --------------------------------------------------------------------------


def cuda_grouped_kernel(device) -> bool:
    """Whether torch's fast (CUTLASS) grouped GEMM runs on this CUDA device: compute capability
    9.x or 10.x (Hopper, Blackwell); torch < 2.9 has it for 9.x only."""
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9 or (major == 10 and is_torch_greater_or_equal("2.9", accept_dev=True))


def _grouped_mm_ok(tensors, dims) -> bool:
    """torch._grouped_mm for these tensors (weights and LoRA factors of one layer) and GEMM widths?

    dims must hold every width the kernels see: gate_up in and out, down in and out (w2.shape[2],
    the intermediate size) and the ranks. The kernel needs 16-byte strides and 16-byte-aligned
    data pointers; a parameter that is a view into a flat buffer (FSDP, some loaders) can start
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


def _grouped_linear(experts, name, w, x, lora, groups, nf4: bool):
    if nf4:  # the base weight exists only in NF4: dequantized per expert group, just in time
        from finetune.qlora import nf4_grouped_linear

        return nf4_grouped_linear(x, experts, name, lora, groups)
    return _LoraGroupedLinear.apply(x, w, *(lora or (None, None, 1.0)), groups)


def experts_forward(experts, hidden_states, top_k_index, top_k_weights, loras):
    """Mixtral-style fused experts with LoRA on activations.

    `loras` maps a parameter name ("gate_up_proj"/"up_proj", "down_proj") to (A (E,r,in),
    B (E,out,r), scaling) or is missing it for no LoRA on that weight.
    """
    num_tokens, top_k = top_k_index.shape
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    w1, w2 = getattr(experts, first), experts.down_proj
    dtype, device = w1.dtype, w1.device
    lora1, lora2 = loras.get(first), loras.get("down_proj")

    # sort (token, k) pairs by expert once; both projections share the groups
    expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    counts = expert_ids.new_zeros(experts.num_experts).scatter_add_(0, expert_ids, torch.ones_like(expert_ids))  # no bincount: a host sync on CUDA
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    loras_used = [lo for lo in (lora1, lora2) if lo]
    dims = [w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2]] + [lo[0].shape[1] for lo in loras_used]
    nf4 = getattr(experts, "nf4", None) is not None  # 4-bit experts (finetune/qlora/__init__.py): a per-expert loop
    if not nf4 and _grouped_mm_ok([w1, w2] + [t for lo in loras_used for t in lo[:2]], dims):
        bounds = None  # no host sync: the kernel reads the offsets on the device
    else:
        ends = offs.tolist()  # one host sync per layer, shared by forward and backward
        bounds = [(e, s, t) for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)) if t > s]
    groups = (counts, offs, bounds)

    with torch.autocast(device.type, enabled=False):  # compute in the weight dtype, like grouped_mm
        x = hidden_states.to(dtype)[perm // top_k]
        h = _grouped_linear(experts, first, w1, x, lora1, groups, nf4)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        y = _grouped_linear(experts, "down_proj", w2, h, lora2, groups, nf4)
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        # routing weights are fp32 from the router: weight and sum in fp32, as transformers does
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=device)
        out = y[inv].view(num_tokens, top_k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


# ---- reading PEFT's wrappers ------------------------------------------------------------------


def _chain(wrapper):
    """The nested ParamWrappers (outermost first) and the experts module they wrap."""
    chain, m = [], wrapper
    while isinstance(m, ParamWrapper):
        chain.append(m)
        m = m.base_layer
    return chain, m


def _factors(w: ParamWrapper, adapters: list[str]):
    """PEFT's per-expert layout: lora_A (r·E, in) rows are expert-major, lora_B (out, r·E)
    columns are rank-major (col = j·E + e); see ParamWrapper.get_delta_factors."""
    dtype = w.get_param().dtype
    parts = []
    for name in adapters:
        a, b = w.lora_A[name].weight, w.lora_B[name].weight
        a = a.reshape(w.num_experts, -1, a.shape[-1]).to(dtype)
        b = b.reshape(b.shape[0], -1, w.num_experts).permute(2, 0, 1).to(dtype).contiguous()
        parts.append((a, b, w.scaling[name]))
    if len(parts) == 1:
        return parts[0]
    # several active adapters sum their deltas: concatenate along the rank, scaling folded into B
    return torch.cat([a for a, _, _ in parts], 1), torch.cat([b * s for _, b, s in parts], 2), 1.0


def _ndim(param) -> int:
    """Dimensions of a parameter, also when DeepSpeed ZeRO-3 holds it partitioned (its data is
    then a (0,) placeholder between forwards; `ds_shape` is the real shape)."""
    return len(getattr(param, "ds_shape", param.shape))


def _static_problem(wrapper) -> str | None:
    """Why this wrapped module can never take the fast path (None if it can)."""
    chain, experts = _chain(wrapper)
    if not hasattr(experts, "has_gate") or not hasattr(experts, "_apply_gate"):
        return f"{type(experts).__name__} is not a transformers @use_experts_implementation experts module"
    if experts.has_bias or experts.is_transposed:
        return f"{type(experts).__name__} has expert biases or transposed weights (not implemented)"
    names = {"gate_up_proj" if experts.has_gate else "up_proj", "down_proj"}
    if any(w.parameter_name not in names or _ndim(w.get_param()) != 3 for w in chain):
        return f"LoRA on {type(experts).__name__} targets parameters other than {sorted(names)}"
    return None


def _plan(wrapper):
    """LoRA factors per parameter for this forward; a str reason to use the stock path; or None
    when no LoRA applies (disabled, merged, no active adapter): the stock path is then exact."""
    chain, experts = _chain(wrapper)
    loras = {}
    for w in chain:
        if w.disable_adapters:
            if w.merged:
                return None  # PEFT unmerges on this forward; let it
            continue
        if w.merged:
            continue  # the delta is already in the weight
        adapters = [a for a in w.active_adapters if a in w.lora_A]
        if not adapters:
            continue
        param = w.get_param()
        if param.dtype not in _FAST_DTYPES:
            return f"expert weights in {param.dtype} (PEFT upcasts them to add the delta)"
        if param.requires_grad:
            return "base expert weights are trainable (the fast path computes no weight gradient)"
        loras[w.parameter_name] = _factors(w, adapters)
    if not loras:
        return None
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (sentinel routing) is not implemented"
    if hasattr(experts, "parametrizations"):
        return "the experts module carries other parametrizations"
    if experts._forward_pre_hooks or experts._forward_hooks or "forward" in experts.__dict__:
        # the fast path never calls the experts module, so its hooks (DeepSpeed ZeRO-3 gathering
        # the weights, accelerate offload) would not run
        return "the experts module has forward hooks or a replaced forward"
    return loras


def _fast_forward(self, *args, **kwargs):
    if len(args) != 3 or kwargs:  # not (hidden_states, top_k_index, top_k_weights)
        plan = f"experts called with {len(args)} positional args and keywords {sorted(kwargs)}"
    else:
        plan = _plan(self)
        if isinstance(plan, dict):
            return experts_forward(_chain(self)[1], *args, plan)
    if isinstance(plan, str):
        if getattr(_chain(self)[1], "nf4", None) is not None:
            raise RuntimeError(f"fast expert LoRA on 4-bit experts: {plan}, and the stock path cannot run on them")
        _warn_once(plan)
    return ParamWrapper.forward(self, *args, **kwargs)


# ---- public API ---------------------------------------------------------------------------------


def _expert_wrappers(model) -> list:
    """Outermost ParamWrappers whose innermost module holds fused 3-D expert weights."""
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    return [w for w in wrappers if id(w) not in inner and _ndim(_chain(w)[0][-1].get_param()) == 3]


def _is_fast(wrapper) -> bool:
    return getattr(wrapper.__dict__.get("forward"), "__func__", None) is _fast_forward


def enable_fast_expert_lora(model) -> int:
    """Route every PEFT-wrapped fused-experts module through the fast path.

    Returns how many expert modules now use it (the same on a repeated call; 0 for a dense
    model or one without expert LoRA). Modules it cannot serve are left stock, with a warning.
    """
    count = 0
    for w in _expert_wrappers(model):
        if _is_fast(w):
            count += 1
            continue
        problem = _static_problem(w)
        if problem is None and "forward" in w.__dict__:
            problem = "the module's forward is already replaced (e.g. by an accelerate hook)"
        if problem:
            _warn_once(problem)
            continue
        w.forward = types.MethodType(_fast_forward, w)
        count += 1
    return count


def disable_fast_expert_lora(model) -> int:
    """Restore PEFT's stock forward; returns how many expert modules this call switched back
    (0 when none was on the fast path, so a repeated call returns 0)."""
    count = 0
    for w in _expert_wrappers(model):
        if _is_fast(w):
            del w.forward
            count += 1
    return count
