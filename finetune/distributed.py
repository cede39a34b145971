"""Several processes: the launch checks, FSDP2 and DeepSpeed ZeRO-3 specifics, the gathered adapter.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m finetune sft RECIPE
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m finetune dpo RECIPE

accelerate's launcher (torchrun underneath) starts the ranks and tells each one, through
environment variables, which mode to run; transformers' Trainer builds the Accelerator that
shards the model. The stages (via finetune/train/) call this module at a few points,
one line each:

  require_deepspeed(), check_launch(args)   when the trainer arguments are built, before
                         anything touches the disk: deepspeed installed if asked for; the
                         launcher's world size equal to the trainer's (a `torchrun` run whose
                         trainer sees one process would train N independent copies into one
                         directory).
  load_base(load, ...)   with FSDP2's cpu_ram_efficient_loading only global rank 0 reads the
                         weights; the other ranks get the same module tree with unfilled storage
                         and receive their shards from rank 0 when accelerate calls fully_shard.
  prepare(trainer)       after the trainer is built: refuse a sharding config accelerate
                         ignored (or FSDP1); register ZeRO-3 leaf modules.
  log_peak_memory(trainer), adapter_state_dict(trainer)   on every rank after training: the
                         rank's peak host RSS; the adapter tensors gathered from their shards
                         (FSDP2 DTensors, ZeRO-3 partitions), for rank 0 to write.
  finish()               at the end of every command (finetune/cli/): the ranks wait for each
                         other, then take the process group down.

Tests: tests/e2e/test_distributed.py (2 processes on CPU, gloo; tests/cpu_launch.py is the shim
that lets accelerate run FSDP2 and ZeRO-3 on CPU processes).
Layer: distributed (beside modeling and runs); imports modeling, moe, errors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import resource
import sys

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from finetune.errors import UserError
from finetune.modeling import resolve_dtype
from finetune.moe import moe_block_classes

log = logging.getLogger("finetune")
# An INFO message that differs per rank (and says its rank): printed by every rank, where other
# INFO messages are printed by rank 0 only (finetune/cli/'s logging setup).
PER_RANK = {"per_rank": True}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested() -> str | None:
    """The sharding mode the launcher asked for: "fsdp2", "fsdp1", "zero3", "deepspeed" or None (DDP/one process)."""
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "deepspeed"
    return None


def launcher_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_deepspeed() -> None:
    """A DeepSpeed config without the package: say how to install it (accelerate would raise an ImportError)."""
    if requested() in ("zero3", "deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "the accelerate config asks for DeepSpeed (distributed_type: DEEPSPEED) but deepspeed is not installed; "
            'install the extra (`pip install -e ".[deepspeed]"`) or pick recipes/accelerate/fsdp2.yaml'
        )


def check_launch(args) -> None:
    """Refuse, on every rank and before the output directory is touched, a launch the trainer does not see.

    `args` is the trl.SFTConfig/DPOConfig; its world_size is the number of processes the Trainer
    will split the data over. torchrun with a CPU-less trainer setting (`use_cpu=false` on a
    machine without GPUs), or DeepSpeed on processes accelerate treats as single, make it 1
    while the launcher started several: each rank would then train the whole data set alone.
    """
    launched, trainer = launcher_world_size(), args.world_size
    if launched != trainer:
        rank = os.environ.get("RANK", "?")
        raise UserError(
            f"the launcher started {launched} processes but the trainer sees {trainer} (rank {rank}): every process "
            "would train on its own. Launch with `accelerate launch --config_file recipes/accelerate/<name>.yaml "
            "-m finetune ...`; on a machine without GPUs use recipes/accelerate/cpu-ddp.yaml and leave sft.use_cpu/"
            "dpo.use_cpu at their default"
        )


# ---- loading: only rank 0 reads the weights under FSDP2 ----------------------------------------


def ram_efficient_loading() -> bool:
    """FSDP2 with cpu_ram_efficient_loading on several ranks: rank 0 loads, the others receive."""
    return requested() == "fsdp2" and _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING") and launcher_world_size() > 1


def load_base(load, config, section):
    """`load()` on global rank 0 (or everywhere when not sharding); an unfilled model elsewhere.

    `config` is the base model's config and `section` the recipe's model section (dtype, attention).

    transformers 5 reads the full checkpoint on every rank even under FSDP (it only skips
    buffer initialisation there), so N ranks on one host would hold N full copies before
    fully_shard. Instead the other ranks build the module tree on the meta device and give it
    uninitialised CPU storage (`to_empty`: the pages are never written, so they cost no RSS);
    accelerate's fsdp2_prepare_model moves it to meta and broadcasts rank 0's weights shard by
    shard. Non-persistent buffers (rotary frequencies) are not in the state dict accelerate
    broadcasts, so rank 0 sends them here. The unfilled storage (rather than meta) keeps a
    run that accelerate turns into plain DDP able to reach prepare(), which refuses it.
    `load` may merge an adapter chain (DPO): the merged model has the base's architecture.
    """
    if not ram_efficient_loading():
        return load()
    rank = torch.distributed.get_rank()
    if rank == 0:
        model = load()
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=resolve_dtype(section.dtype), attn_implementation=section.attn_implementation,
                trust_remote_code=section.trust_remote_code,
            )
        model = model.to_empty(device="cpu")
        model.eval()  # as the loaded model
    _share_non_persistent_buffers(model)
    log.info("rank %d: %s", rank, "loaded the weights" if rank == 0 else "built the model without weights (rank 0 sends them)",
             extra=PER_RANK)
    return model


def _share_non_persistent_buffers(model) -> None:
    names = [name for name, _ in model.named_buffers() if _is_non_persistent(model, name)]
    payload = [{n: model.get_buffer(n) for n in names} if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(payload, src=0)
    for name, value in payload[0].items():
        parent, _, leaf = name.rpartition(".")
        (model.get_submodule(parent) if parent else model).register_buffer(leaf, value.clone(), persistent=False)


def _is_non_persistent(model, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    return leaf in (model.get_submodule(parent) if parent else model)._non_persistent_buffers_set


# ---- after the trainer is built -----------------------------------------------------------------


def prepare(trainer) -> None:
    """Check accelerate took the sharding the launcher asked for; ZeRO-3 leaf modules."""
    mode = requested()
    if mode is None:
        return
    state = trainer.accelerator.state
    plugin = "fsdp_plugin" if mode.startswith("fsdp") else "deepspeed_plugin"
    if getattr(state, plugin, None) is None:
        raise UserError(
            f"the accelerate config asks for {mode} but accelerate runs {state.distributed_type.value}: accelerate "
            "1.15 shards only on GPU-type devices (a CPU run stays DDP), and this run would hold a full model per "
            "process; use recipes/accelerate/cpu-ddp.yaml on CPUs"
        )
    if mode == "fsdp1":
        raise UserError("the accelerate config asks for FSDP version 1 (fsdp_version: 1); finetune shards with FSDP2: "
                        "use recipes/accelerate/fsdp2.yaml or set fsdp_version: 2")
    if sharded_by(trainer) == "zero3":
        register_zero3_leaves(trainer.model)


def sharded_by(trainer) -> str | None:
    """"fsdp2", "fsdp1", "zero3" or None, from the trainer's accelerator (the launcher's environment
    does not say the ZeRO stage when the config is a deepspeed_config_file)."""
    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return "fsdp2" if trainer.accelerator.is_fsdp2 else "fsdp1"
    ds = getattr(state, "deepspeed_plugin", None)
    if ds is not None and int(ds.zero_stage) == 3:
        return "zero3"
    return None


def register_zero3_leaves(model) -> None:
    """Make each MoE block a ZeRO-3 leaf: its parameters (all experts, their LoRA, the router) are
    gathered once when the block runs, instead of module by module, and no hooks are put on its
    children, so the fast expert LoRA path (which never calls the experts module) can serve it."""
    import deepspeed  # optional extra (finetune[deepspeed]): imported only under ZeRO-3

    # DeepSpeed 0.19 does this itself for Mixtral and Qwen2/3-MoE blocks by default (its
    # zero_optimization.leaf_module config); this covers every MoE model, older DeepSpeed, and
    # configs that change that list.
    classes = moe_block_classes(model)
    if not classes:
        return
    leaves = deepspeed.utils.set_z3_leaf_modules(model, classes)
    log.info("ZeRO-3: %d %s modules registered as leaves (experts gathered once per layer)", len(leaves),
             "/".join(c.__name__ for c in classes))


# ---- after training ------------------------------------------------------------------------------


def adapter_state_dict(trainer) -> dict | None:
    """The trainable (adapter) tensors, whole, on every rank; None when the model is not sharded.

    Must run on every rank: gathering is a collective. Only the adapter is gathered, never the
    base weights (accelerator.get_state_dict would assemble all 93 GB of Mixtral-8x7B). Under
    ZeRO-3 a parameter outside GatheredParameters has shape (0,): saving model.state_dict()
    there writes an empty adapter.
    """
    mode = sharded_by(trainer)
    if mode not in ("fsdp2", "zero3") or launcher_world_size() == 1:
        return None
    model = trainer.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if mode == "zero3":
        import deepspeed  # optional extra (finetune[deepspeed]): imported only under ZeRO-3

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}

    sharded = sum(isinstance(p, DTensor) for _, p in named)
    log.info("gathering %d adapter tensors (%d sharded) on rank %d", len(named), sharded, torch.distributed.get_rank(),
             extra=PER_RANK)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True) for n, p in named}


def log_peak_memory(trainer) -> float:
    """This rank's peak resident host memory so far, in GiB (logged on every rank; Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform != "darwin" else 1 << 30)
    log.info("rank %d/%d: peak host RSS %.3f GiB", trainer.args.process_index, trainer.args.world_size, peak,
             extra=PER_RANK)
    return peak


def finish() -> None:
    """End of a command that ran under a launcher: every rank waits for the others (rank 0 writes the
    run while the rest have returned), then takes its process group down, as torch's docs ask.

    Why: a process group left to the interpreter's exit can abort its rank (SIGABRT, "terminate
    called without an active exception": gloo's worker threads still hold tensors while Python shuts
    down; pytorch/pytorch#179291 proposed an atexit fix and was abandoned). Seen once here in a
    2-rank ZeRO-3 test, after training. The launcher then kills every other rank, rank 0 among them
    while it may still be writing the run. Only on a normal return: after a failure the failing rank's
    exit code makes the launcher stop the others, and a barrier there could wait for a dead rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
