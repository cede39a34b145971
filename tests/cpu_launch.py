"""Test support: run `finetune` under accelerate's FSDP2 or DeepSpeed configs on CPU processes (gloo).

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
        tests/cpu_launch.py sft RECIPE

accelerate 1.15 decides the mode of a run in two places that only know GPU-type devices, and
both fall back silently on CPU: AcceleratorState takes its FSDP branch only for MULTI_GPU-like
runs (a CPU run stays DDP), and PartialState finds no backend for DeepSpeed ranks without a GPU
(DeepSpeed itself runs on its CPU accelerator and gloo, but accelerate then counts one process,
so each rank would train alone; finetune's launch check refuses that). This shim fixes exactly
those two decisions, once, before `finetune.cli.main` runs; everything after them (the plugins
built from the launcher's environment, fully_shard, cpu-ram-efficient loading, ZeRO-3
partitioning, the gathered save) is the unchanged code that runs on GPUs.
"""

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__
_prepare_backend = PartialState._prepare_backend


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # as accelerate does at the end of its own init: later AcceleratorState() calls copy
        # PartialState's fields over these
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _backend(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if kind == DistributedType.NO and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and "LOCAL_RANK" in os.environ:
        return "gloo", DistributedType.MULTI_CPU
    return found, kind


AcceleratorState.__init__ = _init
PartialState._prepare_backend = _backend

if __name__ == "__main__":
    from finetune.cli import main

    sys.exit(main())
