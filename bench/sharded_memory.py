"""Peak host memory per rank: one process against 2 ranks under DDP and FSDP2, on one machine.

    python bench/sharded_memory.py                      # ~320 MB float32 model, 2 training steps each
    python bench/sharded_memory.py --hidden 1024 --layers 4 --modes one,fsdp2

Builds a random Mixtral-architecture model (8 experts top-2, the bundled model/tiny-moe
tokenizer) big enough that its weights dominate each process's resident memory, then runs
`finetune sft` on the bundled tasks for 2 steps in each mode and reads every rank's
"peak host RSS" line (finetune/distributed.py logs it after training):

  one          python -m finetune sft (one process)
  ddp          accelerate launch recipes/accelerate/cpu-ddp.yaml (every rank loads the full model)
  fsdp2        recipes/accelerate/fsdp2.yaml (cpu_ram_efficient_loading: rank 0 loads, ranks shard)
  fsdp2-full   the same with --fsdp_cpu_ram_efficient_loading false (every rank loads)

Without GPUs the FSDP2 modes go through tests/cpu_launch.py, the shim that lets accelerate run
FSDP2 on CPU processes (it changes accelerate's choice of mode, nothing else).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
MODES = ("one", "ddp", "fsdp2", "fsdp2-full")


def build(path: Path, hidden: int, layers: int) -> float:
    """Write the random model with the bundled tokenizer; returns its size in GiB."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "model" / "tiny-moe")
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = MixtralForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def command(mode: str, recipe: Path) -> list[str]:
    if mode == "one":
        return [sys.executable, "-m", "finetune", "sft", str(recipe)]
    config = "cpu-ddp" if mode == "ddp" else "fsdp2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / f"{config}.yaml"),
           "--num_processes", "2", "--mixed_precision", "no"]
    if mode == "fsdp2-full":
        cmd += ["--fsdp_cpu_ram_efficient_loading", "false"]
    if mode.startswith("fsdp2") and not torch.cuda.is_available():
        return cmd + [str(REPO / "tests" / "cpu_launch.py"), "sft", str(recipe)]
    return cmd + ["-m", "finetune", "sft", str(recipe)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = build(tmp / "model", args.hidden, args.layers)
        print(f"random Mixtral hidden={args.hidden} layers={args.layers} 8 experts: {size:.3f} GiB of float32 weights")
        print(f"{'mode':<11} {'ranks':>5}  peak host RSS per rank (GiB)")
        for mode in args.modes.split(","):
            recipe = tmp / f"{mode}.yaml"
            recipe.write_text(yaml.safe_dump({
                "output_dir": str(tmp / f"run-{mode}"),
                "model": {"name_or_path": str(tmp / "model"), "dtype": "float32"},
                "data": {"train": [str(REPO / "data" / "tiny-tasks" / "sft.jsonl")], "max_length": 128},
                "lora": {"attention": {"r": 8, "alpha": 16}, "experts": {"r": 8, "alpha": 16}},
                "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1},
            }))
            proc = subprocess.run(command(mode, recipe), capture_output=True, text=True, env=env, cwd=tmp)
            if proc.returncode != 0:
                print(f"{mode}: failed\n{proc.stderr[-3000:]}")
                continue
            peaks = sorted((int(r), float(g)) for r, _, g in re.findall(r"rank (\d+)/(\d+): peak host RSS ([\d.]+) GiB", proc.stderr))
            print(f"{mode:<11} {len(peaks):>5}  " + "  ".join(f"rank {r}: {g:.3f}" for r, g in peaks))


if __name__ == "__main__":
    main()
