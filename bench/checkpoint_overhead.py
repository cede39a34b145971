"""What the default checkpoints (every 100 steps, newest 2 kept) cost on the tiny recipe, measured in one run.

    python bench/checkpoint_overhead.py [--steps 200] [--threads 1]      # from the repository root, CPU is fine

Trains recipes/tiny-moe/sft.yaml twice for --steps steps, with the default checkpoints and with
`save_strategy: no`, into a temporary directory, and prints both wall times, their ratio, and the
time of every checkpoint save, timed by a TrainerCallback from the step's end to `on_save` (the
Trainer saves in between; on a step that also logs, the logging is included), so it is less
noisy than the difference of two runs on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared 2-core machine)")
    args = parser.parse_args()
    steps = args.steps
    torch.set_num_threads(args.threads)
    saves: list[float] = []

    class SaveTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self.step_end = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            saves.append(time.perf_counter() - self.step_end)

    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("checkpoints", []), ("no checkpoints", ["sft.save_strategy='no'"])):
            recipe = read_recipe("recipes/tiny-moe/sft.yaml", [f"output_dir={Path(tmp) / label.replace(' ', '-')}",
                                                               f"sft.max_steps={steps}", "data.eval=[]", *extra])
            t0 = time.perf_counter()
            run_sft(recipe, callbacks=[SaveTimer()])
            walls[label] = time.perf_counter() - t0
    print(f"\n{steps} steps: with checkpoints {walls['checkpoints']:.1f} s, without {walls['no checkpoints']:.1f} s, "
          f"ratio {walls['checkpoints'] / walls['no checkpoints']:.3f}")
    print(f"checkpoints written: {len(saves)}, seconds each: {', '.join(f'{s:.3f}' for s in saves)}")


if __name__ == "__main__":
    main()
