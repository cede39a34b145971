"""Where a model is loaded for use: the device map and dtype for eval, routing and pipeline.

    finetune eval MODEL --device cuda --dtype bfloat16 ...   (defaults: see choose_placement)

One decision function, so every command places models the same way and tests can check the
GPU branch on a CPU machine (by monkeypatching torch.cuda). Loading itself is transformers'
`from_pretrained(device_map=...)`, which goes through accelerate's big-model loading: weights
go straight to their device, and "auto" spreads the layers over every visible GPU (and CPU RAM
after them) when one GPU is too small.
Layer: load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.errors import UserError
from finetune.modeling import DTYPES

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Placement:
    dtype: torch.dtype
    device_map: str | dict | None
    """None: load on the CPU; "auto": accelerate over every GPU; {"": "cuda:1"}: one device."""

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def _gpu_dtype(model_dtype: torch.dtype | None, bf16_ok: bool) -> torch.dtype:
    # The checkpoint's own 16-bit dtype when it has one (Mixtral ships bfloat16); a float32
    # checkpoint is evaluated in bfloat16 (float16 on GPUs without bfloat16), halving memory.
    if model_dtype in SIXTEEN_BIT and (model_dtype != torch.bfloat16 or bf16_ok):
        return model_dtype
    return torch.bfloat16 if bf16_ok else torch.float16


def choose_placement(device: str | None = None, dtype: str | None = None, model_dtype: torch.dtype | None = None) -> Placement:
    """The device map and dtype to evaluate in.

    device: None or "auto" (every GPU if there is one, else the CPU), "cpu", "cuda" (every GPU),
    "cuda:N" (that GPU only). dtype: None or "auto" (16-bit on GPUs, float32 on the CPU),
    "float32", "bfloat16", "float16". model_dtype: the checkpoint's dtype (config.dtype).
    """
    if dtype not in (None, "auto") and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = device or "auto"
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cpu":
        device_map = None
    elif device == "cuda" or device.startswith("cuda:"):
        if not gpus:
            raise UserError(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
        if device == "cuda":
            device_map = "auto"
        else:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= gpus:
                raise UserError(f"--device {device}: {gpus} GPU(s) visible (cuda:0 to cuda:{gpus - 1})")
            device_map = {"": device}
    else:
        raise UserError(f"--device {device}: choose auto, cpu, cuda (every GPU) or cuda:N")
    if dtype not in (None, "auto"):
        return Placement(DTYPES[dtype], device_map)
    if device_map is None:
        return Placement(torch.float32, None)  # CPU kernels are fastest and exact in float32
    return Placement(_gpu_dtype(model_dtype, torch.cuda.is_bf16_supported()), device_map)


def config_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint was saved in, from its config (a string or a torch.dtype)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        return DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None
