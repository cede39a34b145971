"""`finetune plan --launch CONFIG`: the strategy and process count an accelerate config asks for.

    finetune plan recipes/mixtral-8x7b/sft.yaml --launch recipes/accelerate/fsdp2.yaml
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.errors import UserError


def read_launch(path: str) -> tuple[str, int, int]:
    """(strategy row name, processes per node, nodes) of an accelerate config file."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"--launch {path}: cannot read an accelerate config ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict) or "distributed_type" not in raw:
        raise UserError(f"--launch {path}: not an accelerate config (no distributed_type); see recipes/accelerate/")
    kind = raw["distributed_type"]
    nodes = int(raw.get("num_machines", 1) or 1)
    processes = int(raw.get("num_processes", 1) or 1)
    if kind == "FSDP":
        strategy = "FSDP2"
    elif kind == "DEEPSPEED":
        ds = raw.get("deepspeed_config") or {}
        if ds.get("zero_stage") != 3:
            raise UserError(f"--launch {path}: DeepSpeed ZeRO stage {ds.get('zero_stage')} is not planned (ZeRO-3 is)")
        strategy = "ZeRO-3 + offload" if ds.get("offload_param_device") == "cpu" else "ZeRO-3"
    elif kind in ("MULTI_GPU", "MULTI_CPU"):
        strategy = "DDP" if processes > 1 else "one process"
    elif kind == "NO":
        strategy = "one process"
    else:
        raise UserError(f"--launch {path}: distributed_type {kind} is not planned (DDP, FSDP, DEEPSPEED are)")
    return strategy, max(1, processes // nodes), nodes
