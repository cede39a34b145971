"""Measured side of the planner's FSDP2 check: peak RSS of one rank of 2 CPU processes (gloo)
training LoRA steps on a random float32 Mixtral sharded with FSDP2 (`fully_shard` on each
decoder layer, then the root, as accelerate does with the model's `_no_split_modules`).

The model is built on the meta device, wrapped with this project's LoRA and sharded before any
storage exists, then each rank materialises only its shards (random values): the peak is the
training step's, not a load's (loading is not what `finetune plan` models).

    python -m torch.distributed.run --nproc_per_node 2 tests/unit/plan/plan_fsdp_measure.py SIZES_JSON BATCH SEQ
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist
from plan_measure import _vm, random_config, wrapped_model
from torch.distributed.fsdp import fully_shard


def main(sizes: dict, batch: int, seq: int, steps: int = 2) -> dict:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gc.collect()
    baseline = _vm("VmRSS")
    config = random_config("mixtral", **sizes)
    plan, model = wrapped_model(config, "sdpa", meta=True)
    from peft import get_peft_model

    from finetune.lora.fast_experts import enable_fast_expert_lora
    from finetune.lora.targets import lora_config
    from finetune.plan.shapes import decoder_layers, model_shape

    shape = model_shape(config, model, plan)
    model = get_peft_model(model, lora_config(plan))
    enable_fast_expert_lora(model)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(0.0, 0.02, generator=gen)
    rotary = model.base_model.model.model.rotary_emb  # a non-persistent buffer: rebuilt on the CPU
    model.base_model.model.model.rotary_emb = type(rotary)(config=config)
    built = _vm("VmHWM") - baseline
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    marks = []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        marks.append(_vm("VmHWM") - baseline)
        loss.backward()
        del loss
        marks.append(_vm("VmHWM") - baseline)
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = _vm("VmHWM") - baseline
    from finetune.plan.memory import Setup, estimate

    setup = Setup(batch=batch, seq=seq, dtype_bytes=4, lora_bytes=4, kernel="sdpa", checkpointing=False,
                  dpo=False, nf4=False, world=world, cuda=False)
    e = estimate(shape, setup, "FSDP2")
    out = {"rank": rank, "measured": measured, "built": built, "marks": marks, "planned": e.peak, "parts": e.parts, "params": shape.total_params}
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))), flush=True)
