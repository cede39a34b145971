"""4-bit experts: a transformers experts module whose fused weights live in NF4 buffers.

    finetune sft recipes/mixtral-8x7b/sft-qlora.yaml      # model.quantization: nf4

Each expert's matrix of `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) (or (E, H, 2I) and
(E, I, H) where the module says `is_transposed`: gpt-oss) is quantized, in the orientation it is
stored in, (finetune/qlora/nf4.py) into non-persistent buffers of the experts module; the 16-bit parameter
is replaced by a one-element NaN placeholder broadcast to the original shape (PEFT still reads
shape, dtype and device to build its 3-D LoRA factors, while anything that computes with the
placeholder turns NaN instead of silently using wrong weights). The module becomes a subclass
that carries its own grouped linear (`grouped_linear`): the fast expert path
(finetune/lora/fast_experts.py) asks the experts module for it, so the 16-bit code never imports
this layer. Its base matmul (`NF4Weight`) dequantizes one expert at a time, forward and
backward, inside the one autograd function of finetune/lora/grouped_mm.py; gradients reach the
inputs and LoRA factors only. Expert biases (gpt-oss) stay 16-bit parameters; the fast path adds them.
Layer: qlora; imports lora (grouped GEMMs, fast experts' forward), moe, errors.
"""

from __future__ import annotations

import torch

from finetune.errors import Problem, UserError
from finetune.lora.fast_experts import experts_forward, layout_problem
from finetune.lora.grouped_mm import grouped_linear
from finetune.moe import expert_weight_names, experts_modules
from finetune.qlora.nf4 import dequantize_expert, quantize_per_expert

STOCK_PATH = ("PEFT's stock expert path (lora.expert_path: peft) cannot apply LoRA to 4-bit experts: it adds the delta "
              "to a 16-bit weight that a quantized model does not have; use lora.expert_path: fast")


def is_nf4(experts) -> bool:
    return getattr(experts, "nf4", None) is not None


class NF4Weight:
    """The base matmul of one NF4 expert weight: x·W_eᵀ and dy·W_e per group (W_e as (out, in)),
    W_e dequantized just in time. Each expert is stored in the parameter's own orientation, so a
    transposed layout ((E, in, out), `is_transposed`: gpt-oss) multiplies the other way round."""

    def __init__(self, experts, name: str):
        self.experts, self.name = experts, name
        self.transposed = experts.is_transposed

    def _expert(self, e, dtype, for_input_grad: bool):
        w = dequantize_expert(self.experts, self.name, e, dtype)  # stored (out, in), or (in, out) if transposed
        return w if self.transposed != for_input_grad else w.t()

    def forward(self, x, groups):
        shape = self.experts.nf4["weights"][self.name]["shape"]
        y = x.new_zeros(x.shape[0], shape[1] if self.transposed else shape[0])
        for e, s, t in groups[2]:
            torch.mm(x[s:t], self._expert(e, x.dtype, False), out=y[s:t])
        return y

    def input_grad(self, dy, groups):
        shape = self.experts.nf4["weights"][self.name]["shape"]
        dx = dy.new_zeros(dy.shape[0], shape[0] if self.transposed else shape[1])
        for e, s, t in groups[2]:
            torch.mm(dy[s:t], self._expert(e, dy.dtype, True), out=dx[s:t])
        return dx


def _nf4_grouped_linear(self, name: str, x, lora, groups):
    """This module's grouped linear for the fast expert path; `groups` must carry per-expert bounds."""
    if groups[2] is None:
        raise RuntimeError("4-bit experts need the per-expert loop (bounds), not one grouped_mm over a stacked weight")
    return grouped_linear(x, NF4Weight(self, name), lora, groups)


def _nf4_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    if hasattr(self, "parametrizations"):  # PEFT's stock ParamWrapper wants to add W + BA here
        raise RuntimeError(STOCK_PATH)
    return experts_forward(self, hidden_states, top_k_index, top_k_weights, {})


_CLASSES: dict[type, type] = {}


def _nf4_class(cls: type) -> type:
    """A subclass with the dequantizing grouped linear; its forward (no LoRA) serves where PEFT calls the
    experts module itself: adapters disabled (the DPO reference), a bare 4-bit base."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"NF4{cls.__name__}", (cls,), {
            "forward": _nf4_experts_forward, "grouped_linear": _nf4_grouped_linear, "__module__": __name__})
    return _CLASSES[cls]


def refuse_unserved_experts(model_or_experts) -> None:
    """A UserError if the fast expert path, the only one 4-bit experts run on, cannot serve some
    experts module (checked on the meta model before a 4-bit load, and per module as it quantizes)."""
    for experts in experts_modules(model_or_experts):
        problem = layout_problem(experts)
        if problem:
            raise UserError([Problem("model.quantization", "4-bit experts run on the fast expert path only, and it "
                                     f"cannot serve this model: {problem}; remove the key to train it in 16-bit")])


@torch.no_grad()
def quantize_expert_weight(experts, name: str, w: torch.Tensor, compute_dtype: torch.dtype, staged: bool = False) -> int:
    """Quantize one fused (E, out, in) or (E, in, out) weight of an experts module, expert by expert, into its NF4
    buffers, and put the placeholder in the parameter's place; returns the bytes the buffers hold.
    Called by the loader as each fused tensor arrives (finetune/qlora/loading.py), or on a loaded
    module (quantize_experts_module). The module becomes the 4-bit class once all its weights are in.

    staged: keep the buffers aside until `register_staged` (transformers' loader replaces every
    non-persistent buffer with an empty one after loading, so they are registered after it)."""
    refuse_unserved_experts(experts)
    buffers, nested_blocksize = quantize_per_expert(w, name)
    if staged:
        experts.__dict__.setdefault("nf4_staged", {}).update(buffers)
    else:
        for key, t in buffers.items():
            experts.register_buffer(key, t, persistent=False)
    placeholder = torch.full((), float("nan"), dtype=compute_dtype, device=w.device).expand(w.shape)
    setattr(experts, name, torch.nn.Parameter(placeholder, requires_grad=False))
    done = experts.__dict__.setdefault("nf4_pending", {})
    done[name] = {"shape": tuple(w.shape[1:]), "nested_blocksize": nested_blocksize}
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


