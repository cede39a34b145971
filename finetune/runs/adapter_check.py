"""Check a saved adapter before a run is marked finished: every tensor present, shaped as its LoRA config implies, finite.

    check_saved_adapter(run_dir, base_config)      # called by each stage after saving (finetune/train/save.py)

Why: DeepSpeed ZeRO-3 once saved 48 tensors of shape (0,) (the partitioned placeholders) and the
run reported success. The expected shapes come from PEFT itself: the saved adapter_config.json is
applied to the base model built on the meta device (no memory, no weights), and PEFT's own
state-dict function says which tensors that adapter has and their shapes (r x in and out x r for
Linear targets; r*E rows for 3-D expert parameters; the router's full shape for modules_to_save).
The saved file is then read back from disk and compared tensor by tensor.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune import modeling
from finetune.errors import CheckFailed


def expected_shapes(run_dir: Path, base_config, trust_remote_code: bool = False) -> dict[str, tuple]:
    config = LoraConfig.from_pretrained(str(run_dir))
    config.inference_mode = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's pattern-key warnings, see finetune/cli/
        model = get_peft_model(modeling.meta_model(base_config, trust_remote_code), config)
        return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def check_saved_adapter(run_dir: Path, base_config, trust_remote_code: bool = False) -> int:
    """Number of tensors checked; CheckFailed naming the first problems otherwise."""
    path = Path(run_dir) / "adapter_model.safetensors"
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckFailed(f"saved adapter {path} cannot be read back ({exc}); the run is not marked finished") from None
    want = expected_shapes(Path(run_dir), base_config, trust_remote_code)
    problems = [f"{k}: missing" for k in want if k not in saved]
    problems += [f"{k}: not in the LoRA config" for k in saved if k not in want]
    for key, tensor in saved.items():
        if key not in want:
            continue
        if tuple(tensor.shape) != want[key]:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {want[key]}")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key}: holds NaN or infinite values")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckFailed(f"saved adapter {path} is broken, so the run is not marked finished: "
                          + "; ".join(problems[:5]) + more)
    return len(saved)
