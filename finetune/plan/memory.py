"""Bytes per GPU for each launch strategy: weights, LoRA and its optimizer state, activations,
logits, MoE dispatch, sharded gather buffers and a CUDA allowance (`finetune plan`).

Constants carry their source: measured in this project (bytes per 4-bit parameter), or stated
allowances (CUDA context, allocator slack) that no measurement here has set.

    finetune plan recipes/mixtral-8x7b/sft.yaml --gpus 8
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.plan import activations as act
from finetune.plan.shapes import ModelShape

# Bytes per 4-bit parameter with its quantization state, measured by bench/qlora_memory.py on a
# random 791M Mixtral-architecture model (README, "Memory"): fused NF4 experts 0.516, attention
# Linear4bit 0.518. Embeddings, lm_head, norms and routers stay 16-bit.
NF4_EXPERT_BYTES = 0.516
NF4_LINEAR_BYTES = 0.518
# Allowances, stated, not measured here: the CUDA context with cuBLAS/NCCL workspaces, and the
# caching allocator's fragmentation as a share of everything allocated.
CUDA_CONTEXT = 1.0 * 1024**3
ALLOCATOR_SLACK = 0.05
# The CPU variant's counterpart of the CUDA context: what a process's first training steps add to
# its RSS beyond the tensors (lazily built kernels and thread pools, malloc arenas). Measured with
# tests/unit/plan/plan_measure.py on a 0.29M-parameter Mixtral (hidden 64, batch 2 x 256): 40.6 and 41.6 MB
# peak above the import baseline (two runs), of which the tensor terms here explain 16.8 MB.
# The larger models of tests/unit/plan/test_plan_memory.py check it.
CPU_RUNTIME = 23 * 1024**2
STRATEGIES = ("one process", "DDP", "FSDP2", "ZeRO-3", "ZeRO-3 + offload")
CONFIGS = {"one process": None, "DDP": "recipes/accelerate/ddp.yaml", "FSDP2": "recipes/accelerate/fsdp2.yaml",
           "ZeRO-3": "recipes/accelerate/zero3.yaml", "ZeRO-3 + offload": "recipes/accelerate/zero3-offload.yaml"}


@dataclass
class Setup:
    """What the recipe and the command line fix; the micro-batch varies in the search."""

    batch: int
    seq: int
    dtype_bytes: int
    lora_bytes: int
    kernel: str
    checkpointing: bool
    dpo: bool
    nf4: bool
    world: int
    nodes: int = 1
    cuda: bool = True
    """False: the CPU variant (no CUDA context or allocator slack), for the RSS check."""


@dataclass
class Estimate:
    strategy: str
    parts: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    note: str = ""
    host: int = 0
    """Host RAM per node that the strategy needs (offload), 0 otherwise."""


def weight_bytes(m: ModelShape, b: int, nf4: bool) -> float:
    if not nf4:
        return m.total_params * b
    linears = sum(s.params - s.expert_params for s in m.layers)  # attention (+ router, norms: counted 4-bit, small)
    rest = m.total_params - m.expert_params - linears
    return m.expert_params * NF4_EXPERT_BYTES + linears * NF4_LINEAR_BYTES + rest * b


def activation_parts(m: ModelShape, s: Setup) -> dict[str, int]:
    rows = s.batch * (2 if s.dpo else 1)  # DPO: chosen and rejected in one pass
    parts = {
        "activations": act.saved_peak(m, rows, s.seq, s.dtype_bytes, s.kernel, s.checkpointing, s.lora_bytes),
        "backward buffers": act.backward_buffers(m, rows, s.seq, s.dtype_bytes, s.kernel, s.lora_bytes),
        "logits": act.logits_transient(m, rows, s.seq, s.dtype_bytes),
        "moe dispatch": act.dispatch_transient(m, rows, s.seq, s.dtype_bytes),
    }
    if s.nf4:  # one expert's gate_up dequantized just in time, and its transposed copy
        widest = max((l.expert_inter * 2 * m.hidden for l in m.layers if l.experts), default=0)
        parts["dequantized expert"] = 2 * widest * s.dtype_bytes
    return parts


def lora_state(m: ModelShape, la: int) -> int:
    """LoRA weights, gradients and AdamW's two moments, all in the adapters' dtype."""
    return (m.lora_total) * la * 4


def estimate(m: ModelShape, s: Setup, strategy: str) -> Estimate:
    e = Estimate(strategy)
    n = s.world
    if s.nf4 and strategy not in ("one process", "DDP"):
        e.note = "4-bit base: sharded strategies are not implemented (one GPU or DDP)"
        return e
    if strategy == "one process" and n > 1:
        e.note = f"uses 1 of the {n} GPUs"
    if strategy in ("DDP", "FSDP2", "ZeRO-3") and n == 1:
        e.note = "needs 2+ GPUs (shards nothing on one)" if strategy != "DDP" else "needs 2+ GPUs"
        return e
    weights = weight_bytes(m, s.dtype_bytes, s.nf4)
    state = lora_state(m, s.lora_bytes)
    largest_layer = max(l.params for l in m.layers) * s.dtype_bytes
    root = (m.embed_params + m.head_params) * s.dtype_bytes
    if strategy in ("one process", "DDP"):
        e.parts["base weights"] = int(weights)
        e.parts["LoRA + grads + AdamW"] = state
        if strategy == "DDP":
            e.parts["DDP gradient buckets"] = m.lora_total * s.lora_bytes
    elif strategy == "FSDP2":
        e.parts["base weights (1/N)"] = int(weights / n)
        e.parts["LoRA + grads + AdamW (1/N)"] = state // n
        # the layer running, unsharded; the next one prefetched: its all-gather output buffer and
        # the unsharded parameters FSDP2 copies out of it (both alive until the copy-out ends);
        # the all-gather input (this rank's shard, flat). The root unit (embeddings, lm_head)
        # stays unsharded from its forward to its backward.
        e.parts["gathered layers (3 + input)"] = 3 * largest_layer + largest_layer // n
        e.parts["root unit (embed, lm_head)"] = root
    elif strategy == "ZeRO-3":
        e.parts["base weights (1/N)"] = int(weights / n)
        e.parts["LoRA + grads + AdamW (1/N)"] = state // n
        # each MoE block is a leaf module (finetune/distributed.py): gathered whole, one at a time
        e.parts["gathered layer"] = max(largest_layer, root // 2)
        e.parts["prefetch bucket"] = int(0.9 * m.hidden**2 * s.dtype_bytes)  # accelerate's "auto"
    else:  # ZeRO-3 + offload: weights and optimizer state live in host RAM
        e.parts["gathered layer"] = max(largest_layer, root // 2)
        e.parts["prefetch bucket"] = int(0.9 * m.hidden**2 * s.dtype_bytes)
        e.parts["LoRA grads (1/N)"] = m.lora_total * s.dtype_bytes // n
        e.host = int(weights / s.nodes + state / s.nodes)
        e.note = f"host RAM per node {e.host / 1024**3:.0f} GiB; PCIe-bound, slower than the time shown"
    e.parts.update(activation_parts(m, s))
    total = sum(e.parts.values())
    if s.cuda:
        e.parts["allocator slack (5%)"] = int(total * ALLOCATOR_SLACK)
        e.parts["CUDA context"] = int(CUDA_CONTEXT)
    else:
        e.parts["CPU runtime"] = CPU_RUNTIME
    e.peak = sum(e.parts.values())
    return e
