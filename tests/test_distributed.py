"""SFT with two processes on CPU (DDP over gloo, launched by torchrun): the stage runs distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import recipe_file, sft_recipe
from safetensors.torch import load_file


def test_sft_with_two_processes(tmp_path, tiny_mixtral, sft_file):
    recipe = recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file, sft={"max_steps": 2, "per_device_train_batch_size": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finetune", "sft", str(recipe)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sft-run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert proc.stdout.count("SFT finished") == 1  # only the main process writes and reports
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("experts.lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
