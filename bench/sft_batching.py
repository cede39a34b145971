"""What SFT batching costs on the bundled recipe: padding-free (the default) vs padded random batches
vs length-grouped padded batches, timed in one run, interleaved so a shared machine's load falls on all.

    python bench/sft_batching.py [--steps 30] [--repeats 2] [--threads 2]     # from the repository root, CPU

Trains recipes/tiny-moe/sft.yaml for --steps optimizer steps per setting into a temporary
directory (no eval, no checkpoints) and prints seconds per step, the ratio to padding-free, and the
share of padding tokens each setting fed the model (finetune/train/tokens.py's counter).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft
from finetune.train.tokens import TokenCounter

SETTINGS = {
    "padding-free (default)": [],
    "padded, random": ["sft.padding_free=false"],
    "padded, group_by_length": ["sft.padding_free=false", "sft.train_sampling_strategy=group_by_length"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seconds = {name: [] for name in SETTINGS}
    padding = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for index, (name, extra) in enumerate(SETTINGS.items()):
                out = Path(tmp) / f"repeat{repeat}-setting{index}"
                recipe = read_recipe("recipes/tiny-moe/sft.yaml", [f"output_dir={out}", f"sft.max_steps={args.steps}",
                                                                   "data.eval=[]", "sft.save_strategy=no", *extra])
                counter = TokenCounter()
                t0 = time.perf_counter()
                run_sft(recipe, callbacks=[counter])
                seconds[name].append((time.perf_counter() - t0) / args.steps)
                counts = counter.summary()
                padding[name] = (counts["padding_tokens"], counts["tokens_fed"])
    base = statistics.median(seconds["padding-free (default)"])
    print(f"\n{args.steps} steps x {args.repeats} repeats, {args.threads} threads, torch {torch.__version__}")
    print("| batching | s/step (median) | vs padding-free | padding tokens / all tokens fed |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        pad, total = padding[name]
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x | {pad:,} / {total:,} ({pad / max(total, 1):.0%}) |")


if __name__ == "__main__":
    main()
