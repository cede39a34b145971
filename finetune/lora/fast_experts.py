"""Fast LoRA on fused MoE expert weights: apply the low-rank update to activations, not weights.

PEFT's `target_parameters` path (peft.tuners.lora.layer.ParamWrapper) folds W + s·B·A into a
full (E, out, in) weight on every forward, so autograd also builds a full-size weight gradient.
Here each expert group of routed tokens computes x·W_eᵀ + s·((x·A_eᵀ)·B_eᵀ) (+ the expert's bias)
instead: the base GEMM plus two thin GEMMs through the rank, for gate_up and for down. Every layout
of transformers' `@use_experts_implementation` experts is served (weights (E, out, in) or
(E, in, out), biases, concatenated or interleaved gate/up or no gate, clamped or custom gates: the
module's own `_apply_gate`/`act_fn` run); other experts modules (Llama-4's text experts, which take
pre-routed inputs) stay on PEFT's stock path with a warning naming the reason. A custom autograd Function
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
The grouped GEMMs and the autograd function live in finetune/lora/grouped_mm.py.
Tests: `pytest tests/unit/lora/test_fast_experts.py`. Benchmark: `python bench/expert_lora.py --tiny`.
Layer: lora; imports lora.grouped_mm and moe only.
"""

from __future__ import annotations

import types
import warnings

import torch
from peft.tuners.lora.layer import ParamWrapper
from transformers.integrations import moe as moe_integration

from finetune.lora.grouped_mm import StackedWeight, expert_groups, grouped_linear, grouped_mm_ok
from finetune.moe import shape_of

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _warn_once(msg: str) -> None:
    # once per distinct message: Python's default warning filter keeps a registry per call site
    warnings.warn(f"fast expert LoRA: {msg}; using PEFT's stock path for it", stacklevel=3)


# ---- one MoE layer --------------------------------------------------------------------------


def _grouped_linear(experts, name, x, lora, groups, expert_ids):
    own = getattr(experts, "grouped_linear", None)
    if own is not None:  # 4-bit experts (finetune/qlora/experts.py) bring their own base matmul
        y = own(name, x, lora, groups)
    else:
        y = grouped_linear(x, StackedWeight(getattr(experts, name), experts.is_transposed), lora, groups)
    if experts.has_bias:  # (E, out) biases stay 16-bit parameters; autograd reaches them if they train
        y = y + getattr(experts, f"{name}_bias")[expert_ids].to(y.dtype)
    return y


def experts_forward(experts, hidden_states, top_k_index, top_k_weights, loras):
    """A transformers `@use_experts_implementation` experts module with LoRA on activations, in
    any of its layouts: weights (E, out, in) or (E, in, out) (`is_transposed`), expert biases
    (`has_bias`), gate and up concatenated or interleaved or no gate at all (the module's own
    `_apply_gate` / `act_fn` decide, as in transformers' grouped_mm forward), a post-expert norm.

    `loras` maps a parameter name ("gate_up_proj"/"up_proj", "down_proj") to (A (E,r,in),
    B (E,out,r), scaling) or is missing it for no LoRA on that weight. PEFT's factors mean
    W_e + s·B_e·A_e in (out, in) terms for both weight orientations (ParamWrapper swaps its
    in/out features unless the module says `is_transposed`), so they need no transposing here.
    """
    num_tokens, top_k = top_k_index.shape
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    w1, w2 = getattr(experts, first), experts.down_proj
    dtype, device = w1.dtype, w1.device
    lora1, lora2 = loras.get(first), loras.get("down_proj")

    # sort (token, k) pairs by expert once; both projections share the groups
    expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    loras_used = [lo for lo in (lora1, lora2) if lo]
    dims = [w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2]] + [lo[0].shape[1] for lo in loras_used]
    # experts with their own matmul (4-bit) loop over experts; grouped_mm reads the offsets on the device
    own = getattr(experts, "grouped_linear", None) is not None
    loop = own or not grouped_mm_ok([w1, w2] + [t for lo in loras_used for t in lo[:2]], dims)
    groups = expert_groups(expert_ids, experts.num_experts, loop)

    with torch.autocast(device.type, enabled=False):  # compute in the weight dtype, like grouped_mm
        x = hidden_states.to(dtype)[perm // top_k]
        h = _grouped_linear(experts, first, x, lora1, groups, expert_ids)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        y = _grouped_linear(experts, "down_proj", h, lora2, groups, expert_ids)
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        # routing weights are fp32 from the router: weight and sum in fp32, as transformers does
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=device)
        out = y[inv].view(num_tokens, top_k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


# ---- reading PEFT's wrappers ------------------------------------------------------------------


def _nest(wrapper):
    """The nest of PEFT ParamWrappers around one experts module (outermost first; one per targeted
    parameter and adapter), and the experts module inside."""
    nest, m = [], wrapper
    while isinstance(m, ParamWrapper):
        nest.append(m)
        m = m.base_layer
    return nest, m


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


def _dispatched(experts) -> bool:
    """Whether the module's forward is transformers' experts dispatch itself (the function that
    `use_experts_implementation` installs), not a subclass's forward around it. 4-bit experts
    (finetune/qlora/experts.py) are a subclass of the family's class: that class is asked."""
    cls = type(experts)
    if getattr(experts, "grouped_linear", None) is not None:
        cls = cls.__mro__[1]
    code = getattr(cls.forward, "__code__", None)
    return code is not None and code.co_filename == moe_integration.__file__ and hasattr(cls.forward, "__wrapped__")


def layout_problem(experts) -> str | None:
    """Why the fast path cannot stand in for this experts module's forward (None if it can)."""
    name = type(experts).__name__
    if not hasattr(experts, "has_gate") or not hasattr(experts, "_apply_gate"):
        return (f"{name} is not a transformers @use_experts_implementation experts module (no routed "
                "(hidden_states, top_k_index, top_k_weights) forward to stand in for)")
    if not _dispatched(experts):
        # e.g. Ergo's experts repeat each token per route and normalise around the dispatched call;
        # standing in for the dispatch alone would skip that
        return f"{name} overrides the dispatched experts forward with its own code around it"
    return None


def _static_problem(wrapper) -> str | None:
    """Why this wrapped module can never take the fast path (None if it can)."""
    nest, experts = _nest(wrapper)
    problem = layout_problem(experts)
    if problem:
        return problem
    names = {"gate_up_proj" if experts.has_gate else "up_proj", "down_proj"}
    if any(w.parameter_name not in names or len(shape_of(w.get_param())) != 3 for w in nest):
        return f"LoRA on {type(experts).__name__} targets parameters other than {sorted(names)}"
    return None


def _active_factors(wrapper):
    """LoRA factors per parameter for this forward; a str reason to use the stock path; or None
    when no LoRA applies (disabled, merged, no active adapter): the stock path is then exact."""
    nest, experts = _nest(wrapper)
    loras = {}
    for w in nest:
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
        factors = f"experts called with {len(args)} positional args and keywords {sorted(kwargs)}"
    else:
        factors = _active_factors(self)
        if isinstance(factors, dict):
            return experts_forward(_nest(self)[1], *args, factors)
    if isinstance(factors, str):
        if getattr(_nest(self)[1], "grouped_linear", None) is not None:  # 4-bit: no 16-bit weight for PEFT
            raise RuntimeError(f"fast expert LoRA on 4-bit experts: {factors}, and the stock path cannot run on them")
        _warn_once(factors)
    return ParamWrapper.forward(self, *args, **kwargs)


# ---- public API ---------------------------------------------------------------------------------


def _expert_wrappers(model) -> list:
    """Outermost ParamWrappers whose innermost module holds fused 3-D expert weights."""
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    return [w for w in wrappers if id(w) not in inner and len(shape_of(_nest(w)[0][-1].get_param())) == 3]


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
