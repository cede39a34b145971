"""The warning `finetune validate` prints when the recipe will not fit the GPUs it finds.

Only where CUDA is visible (on a CPU machine it says nothing): the launch's strategy comes from
accelerate's environment (finetune/distributed.py), the world size from WORLD_SIZE, the memory
from the first GPU. Nothing is loaded.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m finetune validate recipes/mixtral-8x7b/sft.yaml
"""

from __future__ import annotations

import os

import torch

from finetune import distributed
from finetune.plan import hardware, plan

STRATEGY = {"fsdp2": "FSDP2", "fsdp1": "FSDP2", "zero3": "ZeRO-3", "deepspeed": "ZeRO-3"}


def launched_strategy(world: int) -> str:
    mode = distributed.requested()
    if mode in STRATEGY:
        return STRATEGY[mode]
    return "DDP" if world > 1 else "one process"


def fit_warning(checked, cuda: bool | None = None, memory: int | None = None, world: int | None = None) -> str | None:
    """A one-paragraph warning naming the fix, or None when the plan fits (or there is no GPU)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return None
    memory = memory or torch.cuda.get_device_properties(0).total_memory
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    gpu = hardware.Gpu(f"this GPU ({memory / hardware.GIB:.1f} GiB)", memory, 0.0)
    result = plan(checked, gpu, gpus=world)
    strategy = launched_strategy(world)
    row = next((r for r in result["strategies"] if r["strategy"] == strategy), None)
    if row is None or row["fits"]:
        return None
    stage = result["stage"]
    fixes = []
    if row["largest_micro_batch"]:
        fixes.append(f"micro-batch {row['largest_micro_batch']} (--set {stage}.per_device_train_batch_size="
                     f"{row['largest_micro_batch']}, more gradient accumulation)")
    if not result["gradient_checkpointing"]:
        fixes.append(f"gradient checkpointing (--set {stage}.gradient_checkpointing=true)")
    fixes += [f"{r['strategy']} ({r['config']})" for r in result["strategies"] if r["fits"] and r["strategy"] != strategy]
    if not result["nf4"]:
        fixes.append("a 4-bit base (model.quantization: nf4; one GPU or DDP)")
    return (f"warning: this recipe will not fit: `finetune plan` puts the peak at {row['peak_gib']:.1f} GiB per GPU "
            f"with {strategy} on {world} GPU(s) of {memory / hardware.GIB:.1f} GiB. Fixes: " + "; ".join(fixes)
            + f". Details: finetune plan {result['recipe']} --gpu-memory {memory / hardware.GIB:.1f}GiB --gpus {world}")
