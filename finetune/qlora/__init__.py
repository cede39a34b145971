"""QLoRA for MoE: 4-bit NF4 base weights, the fused experts included, dequantized just in time.

    finetune sft recipes/mixtral-8x7b/sft-qlora.yaml      # a recipe with `model.quantization: nf4`

transformers' bitsandbytes integration (`BitsAndBytesConfig(load_in_4bit=True)`) replaces
`nn.Linear` only; Mixtral's experts are fused 3-D parameters (about 45B of its 47B weights) and
stay 16-bit. This package loads the model through that integration (attention, other linear
layers: bitsandbytes `Linear4bit`, NF4, double quantization), extended so that each expert's
matrix of `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) is quantized as the checkpoint
streams in (finetune/qlora/loading.py), the same way `Linear4bit` quantizes a weight:
`bitsandbytes.functional.quantize_4bit`, NF4, block size 64, absmax double-quantized
(`compress_statistics=True`), one quantization state per expert. The packed bytes and states
become non-persistent buffers of the experts module; the 16-bit parameter is replaced by a
one-element NaN placeholder broadcast to the original shape (so PEFT still reads shape, dtype
and device to build its 3-D LoRA factors, while anything that computes with the placeholder
turns NaN instead of silently using wrong weights). The router (`mlp.gate`) is not an
`nn.Linear` and stays 16-bit: it is tiny and router policies train it.

The experts then run only through the fast expert path (finetune/expert_lora.py), which calls
`nf4_grouped_linear` here: per expert group it dequantizes that expert's matrix, multiplies,
and drops it; backward dequantizes again for the input gradient. The 16-bit working set is one
expert matrix at a time; gradients flow to the inputs and LoRA factors only. PEFT's stock path
(`lora.expert_path: peft`) folds W + BA into the parameter, which here is a placeholder, so it
is refused by validation and raises if reached.
Tests: `pytest tests/test_qlora.py`; memory: `python bench/qlora_memory.py`.
"""

from __future__ import annotations

import logging

import torch

from finetune.errors import UserError

log = logging.getLogger("finetune")

BLOCKSIZE = 64  # bitsandbytes' Linear4bit / Params4bit default, used for the experts too
QUANT_TYPE = "nf4"
STOCK_PATH = ("PEFT's stock expert path (lora.expert_path: peft) cannot apply LoRA to 4-bit experts: it adds the delta "
              "to a 16-bit weight that a quantized model does not have; use lora.expert_path: fast")


def require_bitsandbytes(where: str = "model.quantization"):
    """The bitsandbytes module, or a UserError saying how to install it."""
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise UserError(f"{where}: nf4 needs bitsandbytes, which is not installed ({exc}); "
                        "install it with `pip install 'finetune[qlora]'` (or `pip install bitsandbytes`)") from None
    return bnbf


# ---- the quantized experts container ---------------------------------------------------------


def is_nf4(experts) -> bool:
    return getattr(experts, "nf4", None) is not None


def _nf4_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    if hasattr(self, "parametrizations"):  # PEFT's stock ParamWrapper wants to add W + BA here
        raise RuntimeError(STOCK_PATH)
    from finetune.expert_lora import experts_forward

    return experts_forward(self, hidden_states, top_k_index, top_k_weights, {})


_CLASSES: dict[type, type] = {}


def _nf4_class(cls: type) -> type:
    """A subclass whose forward is the dequantizing grouped path (no LoRA): used with adapters
    disabled (the DPO reference, a bare 4-bit base) where PEFT calls the experts module itself."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"NF4{cls.__name__}", (cls,), {"forward": _nf4_experts_forward, "__module__": __name__})
    return _CLASSES[cls]


def expert_weight_names(experts) -> list[str]:
    return ["gate_up_proj" if experts.has_gate else "up_proj", "down_proj"]


def is_fused_expert_weight(module, name: str) -> bool:
    """`name` is a fused 3-D expert weight of a transformers experts module (also on the meta device)."""
    return (hasattr(module, "has_gate") and hasattr(module, "_apply_gate") and name in expert_weight_names(module)
            and isinstance(getattr(module, name, None), torch.nn.Parameter) and getattr(module, name).ndim == 3)


def experts_modules(model):
    return [m for m in model.modules() if is_fused_expert_weight(m, "down_proj")]


@torch.no_grad()
def quantize_expert_weight(experts, name: str, w: torch.Tensor, compute_dtype: torch.dtype, staged: bool = False) -> int:
    """Quantize one fused (E, out, in) weight of an experts module, expert by expert, into its NF4
    buffers, and put the placeholder in the parameter's place; returns the bytes the buffers hold.
    Called by the loader as each fused tensor arrives (finetune/qlora/loading.py), or on a loaded
    module (quantize_experts_module). The module becomes the 4-bit class once all its weights are in.

    staged: keep the buffers aside until `register_staged` (transformers' loader replaces every
    non-persistent buffer with an empty one after loading, so they are registered after it)."""
    bnbf = require_bitsandbytes()
    if experts.has_bias or experts.is_transposed:
        raise UserError(f"model.quantization: {type(experts).__name__} has expert biases or transposed weights; "
                        "4-bit experts support the Mixtral layout only")
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
    if staged:
        experts.__dict__.setdefault("nf4_staged", {}).update(buffers)
    else:
        for key, t in buffers.items():
            experts.register_buffer(key, t, persistent=False)
    placeholder = torch.full((), float("nan"), dtype=compute_dtype, device=w.device).expand(w.shape)
    setattr(experts, name, torch.nn.Parameter(placeholder, requires_grad=False))
    done = experts.__dict__.setdefault("nf4_pending", {})
    done[name] = {"shape": tuple(w.shape[1:]), "nested_blocksize": st.state2.blocksize}
    if all(n in done for n in expert_weight_names(experts)):
        experts.nf4 = {"dtype": compute_dtype, "weights": experts.__dict__.pop("nf4_pending")}
        experts.__class__ = _nf4_class(type(experts))
    return sum(t.nbytes for k, t in buffers.items() if k.startswith(name))


def register_staged(model) -> None:
    """Register the NF4 buffers that quantize_expert_weight(staged=True) kept aside."""
    for m in model.modules():
        for key, t in m.__dict__.pop("nf4_staged", {}).items():
            m.register_buffer(key, t, persistent=False)


@torch.no_grad()
def quantize_experts_module(experts, compute_dtype: torch.dtype) -> int:
    """Quantize a loaded fused-experts module in place, weight by weight; returns the bytes it now holds."""
    held = 0
    for name in expert_weight_names(experts):
        if name not in experts.__dict__.get("nf4_pending", {}):
            held += quantize_expert_weight(experts, name, getattr(experts, name), compute_dtype)
    return held


def quantize_experts(model, compute_dtype: torch.dtype) -> int:
    """Quantize every fused-experts module of the model still in 16-bit, layer by layer (each 16-bit
    weight is freed before the next is quantized); returns how many modules were quantized."""
    mods = [m for m in experts_modules(model) if not is_nf4(m)]
    for m in mods:
        quantize_experts_module(m, compute_dtype)
    return len(mods)


def dequantize_expert(experts, name: str, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expert e's (out, in) matrix of `name`, dequantized to `dtype` (default: the compute dtype)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

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


# ---- the dequantizing grouped GEMM --------------------------------------------------------------


class _NF4LoraGroupedLinear(torch.autograd.Function):
    """y = x·W_eᵀ + (s·x·A_eᵀ)·B_eᵀ per expert group with W_e dequantized from NF4 just in time.

    Saves x and the rank-sized s·x·Aᵀ (as the 16-bit fast path does); W_e is never saved: backward
    dequantizes it again. Returns gradients for x, A and B only.
    """

    @staticmethod
    def forward(ctx, x, a, b, scaling, experts, name, groups):
        from finetune.expert_lora import _gmm

        bounds = groups[2]
        out_features = experts.nf4["weights"][name]["shape"][0]
        y = x.new_zeros(x.shape[0], out_features)
        for e, s, t in bounds:
            torch.mm(x[s:t], dequantize_expert(experts, name, e, x.dtype).t(), out=y[s:t])
        u = None
        if a is not None:
            u = _gmm(x, a.transpose(1, 2), groups).mul_(scaling)
            y += _gmm(u, b.transpose(1, 2), groups)
        ctx.save_for_backward(x, a, b, u)
        ctx.scaling, ctx.groups, ctx.experts, ctx.name = scaling, groups, experts, name
        return y

    @staticmethod
    def backward(ctx, dy):
        from finetune.expert_lora import _gmm, _gmm_k

        x, a, b, u = ctx.saved_tensors
        groups, dy = ctx.groups, dy.contiguous()
        dx = da = db = None
        g = _gmm(dy, b, groups).mul_(ctx.scaling) if a is not None else None
        if ctx.needs_input_grad[0]:
            dx = x.new_zeros(x.shape)
            for e, s, t in groups[2]:
                torch.mm(dy[s:t], dequantize_expert(ctx.experts, ctx.name, e, dy.dtype), out=dx[s:t])
            if g is not None:
                dx += _gmm(g, a, groups)
        if a is not None and ctx.needs_input_grad[1]:
            da = _gmm_k(g.t(), x, groups)
        if a is not None and ctx.needs_input_grad[2]:
            db = _gmm_k(dy.t(), u, groups)
        return dx, da, db, None, None, None, None


def nf4_grouped_linear(x, experts, name: str, lora, groups):
    """The 4-bit counterpart of expert_lora's grouped linear; `groups` must carry per-expert bounds."""
    if groups[2] is None:
        raise RuntimeError("4-bit experts need the per-expert loop (bounds), not one grouped_mm over a stacked weight")
    a, b, scaling = lora or (None, None, 1.0)
    return _NF4LoraGroupedLinear.apply(x, a, b, scaling, experts, name, groups)


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


def recipe_problems(recipe, own_model=None) -> list:
    """What a recipe with `model.quantization: nf4` must not combine with (finetune/validate.py
    reports these with the rest). `own_model`: a DPO recipe's own model section, before it
    inherited the SFT run's (DPO trains on the base exactly as SFT loaded it)."""
    from finetune.errors import Problem

    problems = []
    if own_model is not None and own_model.quantization == "nf4" and recipe.model.quantization != "nf4":
        problems.append(Problem("model.quantization", "nf4, but the SFT run in from_run trained on a 16-bit base; "
                                "DPO uses the SFT run's base as it was: run SFT with model.quantization: nf4, or remove the key"))
    if recipe.model.quantization != "nf4":
        return problems
    try:
        require_bitsandbytes()
    except UserError as exc:
        problems.append(Problem("model.quantization", str(exc).split(": ", 1)[1]))
    if recipe.lora.expert_path == "peft":
        problems.append(Problem("lora.expert_path", STOCK_PATH))
    from finetune.distributed import requested

    if requested():  # the launcher asked for FSDP or DeepSpeed
        problems.append(Problem("model.quantization", f"nf4 under {requested()} sharding is not implemented (the NF4 "
                                "expert buffers and bitsandbytes' 4-bit weights are not sharded by it); train on one "
                                "GPU or with DDP (recipes/accelerate/ddp.yaml)"))
    if recipe.router.policy == "train":
        problems.append(Problem("router.policy", "`train` is not available with model.quantization: nf4: 4-bit DPO keeps "
                                "the SFT adapter loaded beside the new one, and PEFT's modules_to_save router copy "
                                "(what `train` saves) cannot be active for two adapters at once; use `lora` or `freeze`"))
    return problems
