"""`finetune plan`: will a recipe fit, on which GPUs, with which launch config, and how long it
takes, offline and in seconds, from the model's meta-device module tree (no weights).

Layer: beside validate/export/eval; imports modeling, lora, data, distributed, recipe, errors (downward);
the command line (finetune/cli/) validates the recipe and hands the result in.
Parts: shapes.py (sizes, exact LoRA counts), activations.py (bytes saved for backward, checked
against autograd in tests/unit/plan/test_plan_activations.py), memory.py (per-strategy bytes),
hardware.py (GPUs, FLOPs), render.py (table, JSON).

    finetune plan recipes/mixtral-8x7b/sft.yaml --gpu h100-80gb --gpus 8
    finetune plan recipes/mixtral-8x7b/sft-qlora.yaml --gpu-memory 48GiB --json
"""

from __future__ import annotations

import dataclasses
import math

from finetune import modeling
from finetune.errors import UserError
from finetune.plan import hardware, memory
from finetune.plan.activations import kernel_for
from finetune.plan.shapes import model_shape

MAX_MICRO_BATCH = 64


def _setting(section: dict, key: str, stage: str):
    if key in section:
        return section[key]
    from trl import DPOConfig, SFTConfig  # only for its defaults: trl stays out of `finetune --help`

    cls = SFTConfig if stage == "sft" else DPOConfig
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def shape_of(checked):
    model = modeling.meta_model(checked.config, checked.recipe.model.trust_remote_code)
    return model_shape(checked.config, model, checked.targets)


def setup_for(checked, world: int, nodes: int, nf4: bool, batch: int | None = None, cuda: bool = True) -> memory.Setup:
    recipe = checked.recipe
    section = getattr(recipe, checked.stage)
    dtype = recipe.model.dtype
    b = 4 if dtype == "float32" or (dtype == "auto" and not cuda) else 2
    return memory.Setup(
        batch=batch or _setting(section, "per_device_train_batch_size", checked.stage),
        seq=recipe.data.max_length,
        dtype_bytes=b,
        lora_bytes=2 if nf4 else 4,  # TRL keeps LoRA in bf16 on a quantized base; PEFT upcasts to fp32 otherwise
        kernel=kernel_for(recipe.model.attn_implementation),
        checkpointing=bool(_setting(section, "gradient_checkpointing", checked.stage)),
        dpo=checked.stage == "dpo",
        nf4=nf4,
        world=world,
        nodes=nodes,
        cuda=cuda,
    )


def plan(checked, gpu: hardware.Gpu, gpus: int = 1, nodes: int = 1, nf4: bool | None = None, rows: int | None = None) -> dict:
    """Everything `finetune plan` prints, as a JSON-ready dict."""
    if gpus < 1 or nodes < 1:
        raise UserError(f"--gpus and --nodes must be at least 1, got --gpus {gpus} --nodes {nodes}")
    nf4 = checked.recipe.model.quantization == "nf4" if nf4 is None else nf4
    world = gpus * nodes
    m = shape_of(checked)
    base = setup_for(checked, world, nodes, nf4)
    section = getattr(checked.recipe, checked.stage)
    accum = _setting(section, "gradient_accumulation_steps", checked.stage)
    global_batch = base.batch * accum * world
    strategies = [s for s in memory.STRATEGIES if not (world > 1 and s == "one process")
                  and not (world == 1 and s in ("DDP", "FSDP2", "ZeRO-3"))]
    table = []
    for strategy in strategies:
        e = memory.estimate(m, base, strategy)
        best = _largest_batch(m, base, strategy, gpu.memory) if e.peak else 0
        row = {"strategy": strategy, "config": memory.CONFIGS[strategy], "fits": bool(e.peak) and e.peak <= gpu.memory,
               "peak_gib": round(e.peak / hardware.GIB, 2), "headroom_gib": round((gpu.memory - e.peak) / hardware.GIB, 2) if e.peak else None,
               "largest_micro_batch": best, "note": e.note,
               "parts_gib": {k: round(v / hardware.GIB, 3) for k, v in e.parts.items()}}
        if e.host:
            row["host_ram_gib_per_node"] = round(e.host / hardware.GIB, 1)
        table.append(row)
    # the first strategy in order (least communication, offload last) that runs at some micro-batch;
    # a smaller micro-batch with more accumulation beats offloading the weights over PCIe
    choice = next((r for r in table if r["largest_micro_batch"]), None)
    out = {
        "recipe": checked.recipe.source, "stage": checked.stage, "model": checked.recipe.model.name_or_path,
        "gpu": gpu.name, "gpu_memory_gib": round(gpu.memory / hardware.GIB, 2), "gpus": gpus, "nodes": nodes,
        "nf4": nf4, "max_length": base.seq, "micro_batch": base.batch, "gradient_accumulation": accum,
        "global_batch": global_batch, "gradient_checkpointing": base.checkpointing, "attention": base.kernel,
        "params": {"total": m.total_params, "experts": m.expert_params, "active_per_token": m.active_params,
                   "lora": m.lora_total, "lora_by_group": m.lora_by_group},
        "strategies": table, "recommended": None,
    }
    if choice:
        per_gpu = max(1, global_batch // world)
        # the largest micro-batch that fits and divides the per-GPU share, so the global batch stays
        micro = max(d for d in range(1, min(choice["largest_micro_batch"], per_gpu) + 1) if per_gpu % d == 0)
        rec = {"strategy": choice["strategy"], "config": choice["config"], "micro_batch": micro,
               "gradient_accumulation": max(1, math.ceil(global_batch / (micro * world)))}
        rec["global_batch"] = micro * rec["gradient_accumulation"] * world
        rec.update(_timing(m, checked, base, gpu, world, rec["global_batch"], rows))
        out["recommended"] = rec
    return out


def _largest_batch(m, base: memory.Setup, strategy: str, limit: int) -> int:
    best = 0
    for batch in range(1, MAX_MICRO_BATCH + 1):
        base_b = memory.Setup(**{**base.__dict__, "batch": batch})
        if memory.estimate(m, base_b, strategy).peak > limit:
            break
        best = batch
    return best


def _timing(m, checked, s: memory.Setup, gpu: hardware.Gpu, world: int, global_batch: int, rows: int | None) -> dict:
    if not gpu.bf16_tflops:
        return {"step_seconds": None, "time_note": "no FLOP/s figure for a card given only by --gpu-memory; name it with --gpu"}
    width = m.heads * m.head_dim
    per_token = hardware.flops_per_token(m.active_params, len(m.layers), s.seq, width)
    work = per_token * (1.5 if s.checkpointing else 1.0)  # checkpointing recomputes the forward (2P of 4P)
    tokens = global_batch * s.seq * (2 if s.dpo else 1)  # every row at max_length: an upper bound
    section = getattr(checked.recipe, checked.stage)
    if s.dpo and not section.get("precompute_ref_log_probs"):
        work += per_token / 2  # the reference model's forward
    step = tokens * work / (world * gpu.bf16_tflops * 1e12 * hardware.ASSUMED_MFU)
    out = {"step_seconds": float(f"{step:.4g}"), "utilisation": f"{hardware.ASSUMED_MFU:.0%} of bf16 peak, assumed (no GPU figure measured)",
           "tokens_per_step": tokens, "flops_per_token": per_token}
    steps = section.get("max_steps") if isinstance(section.get("max_steps"), int) and section.get("max_steps") > 0 else None
    if steps is None and rows:
        epochs = _setting(section, "num_train_epochs", checked.stage)
        steps = math.ceil(rows / global_batch) * epochs
    out["steps"] = steps
    out["job_hours"] = float(f"{steps * step / 3600:.4g}") if steps else None
    if not steps:
        out["time_note"] = "job time needs the number of training rows (--rows) for a hub data set"
    return out
