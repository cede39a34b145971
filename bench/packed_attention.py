"""One padding-free batch, forward and backward, with SDPA over the whole pack against finetune's row-by-row SDPA.

    python bench/packed_attention.py [--rows 16] [--min-len 40] [--max-len 220] [--repeats 5] [--threads 1]

Builds one batch of random token rows with TRL's padding-free collator (what SFTTrainer feeds),
runs the bundled model (model/tiny-moe) on it with transformers' SDPA, which masks a block-diagonal
causal mask over the whole pack, and with finetune/train/packed_attention.py, which attends row by
row; checks that the losses and gradients agree, then times both interleaved (median of --repeats)
and prints one markdown row.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.train import packed_attention

MODEL = Path(__file__).resolve().parents[1] / "model" / "tiny-moe"


def step(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=220)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_pretrained(str(MODEL), attn_implementation="sdpa")
    rows = copy.deepcopy(whole)
    assert packed_attention.use_for_padding_free(rows, True)
    vocab = whole.config.vocab_size
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.rows,)).tolist()
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": torch.randint(3, vocab, (n,)).tolist()} for n in lengths])
    batch["use_cache"] = False  # as SFTTrainer's compute_loss: with a cache transformers builds no packed mask

    loss_whole, grads_whole = step(whole, batch)
    loss_rows, grads_rows = step(rows, batch)
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(grads_whole, grads_rows))
    seconds = {"whole": [], "rows": []}
    for _ in range(args.repeats):
        for name, model in (("whole", whole), ("rows", rows)):
            start = time.perf_counter()
            step(model, batch)
            seconds[name].append(time.perf_counter() - start)
    w, r = statistics.median(seconds["whole"]), statistics.median(seconds["rows"])
    print(f"{args.rows} rows of {args.min_len}-{args.max_len} tokens ({sum(lengths)} in the pack), "
          f"{args.threads} thread(s), torch {torch.__version__}; losses {loss_whole:.6f} / {loss_rows:.6f}, "
          f"largest relative gradient difference {worst:.1e}")
    print("| SDPA over the whole pack, s | row by row, s | ratio |")
    print("|---|---|---|")
    print(f"| {w:.3f} | {r:.3f} | {w / r:.2f}x |")


if __name__ == "__main__":
    main()
