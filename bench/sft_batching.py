"""What SFT batching costs on the bundled recipe: padding-free (the default) vs padded random batches
vs length-grouped padded batches, timed in one run, interleaved so a shared machine's load falls on all.

    python bench/sft_batching.py [--steps 30] [--repeats 2] [--threads 2]     # from the repository root, CPU
    python bench/sft_batching.py --full --repeats 1                            # whole runs, as `finetune sft` runs them

Trains recipes/tiny-moe/sft.yaml for --steps optimizer steps per setting into a temporary
directory (no eval, no checkpoints) and prints seconds per step, the ratio to padding-free, and the
share of padding tokens each setting fed the model (finetune/train/tokens.py's counter). --full
runs the recipe as shipped instead (every epoch, its eval and checkpoints) and prints seconds per run.
"padding-free, SDPA over the whole pack" is padding-free batches without finetune's row-by-row
SDPA (finetune/train/packed_attention.py): what TRL and transformers do by themselves.
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
from finetune.train import packed_attention
from finetune.train.tokens import TokenCounter

SETTINGS = {
    "padding-free (default)": [],
    "padding-free, SDPA over the whole pack": [],
    "padded, random": ["sft.padding_free=false"],
    "padded, group_by_length": ["sft.padding_free=false", "sft.train_sampling_strategy=group_by_length"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="whole runs of the recipe as shipped")
    parser.add_argument("--only", default="", help="comma-separated words: run the settings whose name holds one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every setting (as `finetune sft --set`)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {name: extra for name, extra in SETTINGS.items()
                if not args.only or any(word in name for word in args.only.split(","))}
    seconds = {name: [] for name in settings}
    padding = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for index, (name, extra) in enumerate(settings.items()):
                out = Path(tmp) / f"repeat{repeat}-setting{index}"
                short = [] if args.full else [f"sft.max_steps={args.steps}", "data.eval=[]", "sft.save_strategy=no"]
                recipe = read_recipe("recipes/tiny-moe/sft.yaml", [f"output_dir={out}", *short, *args.set, *extra])
                counter = TokenCounter()
                whole_pack = "whole pack" in name
                original = packed_attention.use_for_padding_free
                if whole_pack:
                    packed_attention.use_for_padding_free = lambda model, padding_free: False
                t0 = time.perf_counter()
                try:
                    run_sft(recipe, callbacks=[counter])
                finally:
                    packed_attention.use_for_padding_free = original
                seconds[name].append((time.perf_counter() - t0) / (1 if args.full else args.steps))
                counts = counter.summary()
                padding[name] = (counts["padding_tokens"], counts["tokens_fed"])
    base = statistics.median(seconds.get("padding-free (default)") or next(iter(seconds.values())))
    what = "whole runs" if args.full else f"{args.steps} steps"
    print(f"\n{what} x {args.repeats} repeats, {args.threads} threads, torch {torch.__version__}")
    print(f"| batching | {'s/run' if args.full else 's/step'} (median) | vs padding-free | padding tokens / all tokens fed |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        pad, total = padding[name]
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x | {pad:,} / {total:,} ({pad / max(total, 1):.0%}) |")


if __name__ == "__main__":
    main()
