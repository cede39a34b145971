"""The activation term of the plan: bytes autograd saves for backward, per decoder layer and for
the head, from the layer's widths (finetune/plan/shapes.py), tokens, dtype and attention kernel.

Each line is a tensor that a transformers decoder layer with this project's LoRA (PEFT on
attention/dense MLP, the fast expert path of finetune/lora/fast_experts.py) saves; the list was read
off the autograd graph of tiny models (`_saved_*` of every node) and is checked against
`torch.autograd.graph.saved_tensors_hooks` in tests/unit/plan/test_plan_activations.py on configs that set
nothing here. Frozen linears save only their weight (a parameter, not an activation).

    finetune plan recipes/mixtral-8x7b/sft.yaml
"""

from __future__ import annotations

from finetune.plan.shapes import LayerShape, ModelShape

FP32 = 4
INDEX = 8  # int64 indices (top-k, targets)

# Attention kernels: what the core attention saves. eager: q, k and v (k and v repeated to every
# query head), the fp32 softmax and its cast copy (one tensor in fp32). sdpa: q, k and v at their
# own head counts (GQA inside the kernel), the output and an fp32 logsumexp per head and token;
# measured with torch's CPU flash kernel. The GPU's flash and memory-efficient kernels (sdpa on
# CUDA, flash_attention_2) have the same interface and are planned the same way, not yet
# checked on a GPU.
KERNELS = ("eager", "sdpa")


def kernel_for(attn_implementation: str) -> str:
    return "eager" if attn_implementation == "eager" else "sdpa"


def attention_core(m: ModelShape, B: int, S: int, b: int, kernel: str) -> int:
    T = B * S
    qkv = T * m.heads * m.head_dim * b
    if kernel == "eager":
        probs = B * m.heads * S * S * (FP32 + (b if b != FP32 else 0))
        return 3 * qkv + probs
    kv = T * m.kv_heads * m.head_dim * b
    return qkv + 2 * kv + qkv + T * m.heads * FP32  # q, k, v, output, logsumexp


def _lora_linears(targets: dict, widths: dict, shared: tuple, T: int, b: int, la: int) -> int:
    """Saved by PEFT's LoRA on linears: the input lora_A multiplies (in the LoRA dtype `la`: a
    cast copy per module when it differs from the compute dtype, else one tensor shared by the
    modules that read the same input) and x·A, what lora_B multiplies."""
    out = sum(T * r * la for r in targets.values())
    if la != b:
        return out + sum(T * widths[t] * la for t in targets)
    if any(t in targets for t in shared):
        out += T * widths[shared[0]] * b
    return out + sum(T * widths[t] * b for t in targets if t not in shared)


def layer_saved(s: LayerShape, m: ModelShape, B: int, S: int, b: int, kernel: str, la: int) -> int:
    """Bytes one decoder layer saves for backward (LoRA adapters on, base frozen); `b` is the
    compute dtype's bytes, `la` the LoRA weights' (PEFT keeps adapters in fp32 on a 16-bit base)."""
    T, H = B * S, m.hidden
    out = 2 * (T * H * FP32 + T * FP32)  # two RMSNorms: fp32 input (the upcast) and 1/rms
    widths = {"q_proj": H, "k_proj": H, "v_proj": H, "o_proj": s.o_in}
    out += _lora_linears(s.lora_attn, widths, ("q_proj", "k_proj", "v_proj"), T, b, la)
    if s.qk_norm:  # q/k RMSNorm: fp32 input and 1/rms per head (or per token)
        per = m.heads if s.qk_norm == "head" else 1
        kv_per = m.kv_heads if s.qk_norm == "head" else 1
        out += T * (s.q_out + s.kv_out) * FP32 + T * (per + kv_per) * FP32
    out += attention_core(m, B, S, b, kernel)
    if s.experts:
        k, E, inter = m.top_k, s.experts, s.expert_inter
        out += T * E * FP32 + T * k * INDEX + T * k * FP32 + T * FP32  # router softmax, top-k, renormalise
        routed = T * k
        out += routed * (2 * H + 4 * inter) * b  # gathered x, gate_up output, act, act*up, down output
        out += routed * FP32 + 3 * routed * INDEX  # routing weight; sort permutation, its inverse, token index
        for name, r in s.lora_experts.items():
            out += routed * r * b  # s·x·A per routed row
            out += E * s.expert_out[name] * r * b  # B_e laid out (E, out, r) for the grouped GEMM
            if la != b:  # A_e cast to the compute dtype (a view otherwise)
                out += E * r * (H if name != "down_proj" else inter) * b
    if s.shared_inter:
        out += 3 * T * s.shared_inter * b + (T * H * b + T * b if s.shared_gate else 0)
        # gate_proj, up_proj and the shared expert's own gate read the same hidden state
        widths = {"gate_proj": H, "up_proj": H, "shared_expert_gate": H, "down_proj": s.shared_inter}
        out += _lora_linears(s.lora_shared, widths, ("gate_proj", "up_proj", "shared_expert_gate"), T, b, la)
    if s.dense_inter:
        widths = {"gate_proj": H, "up_proj": H, "down_proj": s.dense_inter}
        out += _lora_linears(s.lora_mlp, widths, ("gate_proj", "up_proj"), T, b, la)
        out += 3 * T * s.dense_inter * b  # gate output (SiLU's input), SiLU output, up output; act*up is down's LoRA input
    return out


def head_saved(m: ModelShape, B: int, S: int, b: int) -> int:
    """Final norm, fp32 log-softmax of the logits (cross entropy upcasts), the targets, RoPE tables."""
    T = B * S
    return T * m.hidden * FP32 + T * FP32 + T * m.vocab * FP32 + T * INDEX + 2 * S * m.head_dim * b


def saved_peak(m: ModelShape, B: int, S: int, b: int, kernel: str, checkpointing: bool, la: int = FP32) -> int:
    """Peak bytes held for backward in one forward+backward. With checkpointing (transformers
    checkpoints each decoder layer) the layer inputs stay and one layer is recomputed at a time,
    after the head's tensors were released."""
    layers = [layer_saved(s, m, B, S, b, kernel, la) for s in m.layers]
    head = head_saved(m, B, S, b)
    norm_input = B * S * (m.hidden * FP32 + FP32)
    if not checkpointing:
        # the first layer's input (the frozen embedding's output) needs no gradient: its RMSNorm saves nothing
        return sum(layers) - norm_input + head
    inputs = len(layers) * B * S * m.hidden * b
    # in fp32 the recomputed layer's RMSNorm saves the very input the checkpoint holds
    shared = B * S * m.hidden * FP32 if b == FP32 else 0
    return inputs + max(head, max(layers) - shared)


def backward_buffers(m: ModelShape, B: int, S: int, b: int, kernel: str, la: int = FP32) -> int:
    """Gradients of one layer's intermediate tensors, alive while that layer's backward runs:
    about the size of what the layer saved."""
    return max(layer_saved(s, m, B, S, b, kernel, la) for s in m.layers)


def logits_transient(m: ModelShape, B: int, S: int, b: int) -> int:
    """Logit buffers beyond the saved log-softmax around the loss and its backward: the logits
    in the compute dtype, their fp32 upcast, then the fp32 gradient and its cast back."""
    T = B * S
    return T * m.vocab * (b + FP32)


def dispatch_transient(m: ModelShape, B: int, S: int, b: int) -> int:
    """MoE dispatch buffers not saved for backward: the weighted expert outputs and their
    unsorted copy (tokens x top-k x hidden each), in one layer at a time."""
    if not any(s.experts for s in m.layers):
        return 0
    return 2 * B * S * m.top_k * m.hidden * b
