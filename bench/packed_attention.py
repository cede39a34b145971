"""Padding-free batches, forward and backward: SDPA over the whole pack, SDPA within rows, padded batches.

    python bench/packed_attention.py [--rows 16] [--batches 4] [--min-len 40] [--max-len 220] [--repeats 5]
    python bench/packed_attention.py --threads 2
    python bench/packed_attention.py --device cuda --dtype bfloat16 --hidden 2048 --layers 8 \
        --experts 8 --rows 16 --min-len 256 --max-len 4096          # a GPU at a real model's widths

Draws --batches x --rows random token rows and makes --batches batches of --rows rows each, as a
run's steps would be: packs in the rows' order with TRL's padding-free collator (what SFTTrainer
feeds), or padded batches.
The model is the bundled one (model/tiny-moe), or with --hidden/--layers/--experts a random model
of its architecture at those sizes (nothing is downloaded). It times, interleaved (median of
--repeats, the GPU synchronized), a forward and backward of every batch, summed, for:
- the packs with transformers' SDPA, which masks a block-diagonal causal mask over the whole pack;
- the packs with finetune/train/packed_attention.py, which attends within each row;
- padded batches of all the rows sorted by length (what length-grouped sampling gives a step: near
  equal lengths), and padded batches in the rows' order (random sampling).
It checks first that the two packed runs give the same loss and gradients, and prints markdown rows.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.train import packed_attention

MODEL = Path(__file__).resolve().parents[1] / "model" / "tiny-moe"


def build(args):
    dtype = getattr(torch, args.dtype)
    if not (args.hidden or args.layers or args.experts):
        return AutoModelForCausalLM.from_pretrained(str(MODEL), attn_implementation="sdpa", dtype=dtype)
    config = AutoConfig.from_pretrained(str(MODEL))
    if args.hidden:
        config.update({"hidden_size": args.hidden, "intermediate_size": args.hidden * 2,
                       "num_attention_heads": max(args.hidden // 128, 1),
                       "num_key_value_heads": max(args.hidden // 512, 1)})
    config.update({"num_hidden_layers": args.layers or config.num_hidden_layers,
                   "num_local_experts": args.experts or config.num_local_experts,
                   "max_position_embeddings": max(config.max_position_embeddings, args.max_len)})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def step(model, batch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def timed(model, batch, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=220)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, help="a random model of the bundled architecture at this width")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--experts", type=int)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    whole = build(args).to(args.device)
    rows = copy.deepcopy(whole)
    assert packed_attention.use_for_padding_free(rows, True)
    vocab = whole.config.vocab_size
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.rows * args.batches,)).tolist()
    examples = [{"input_ids": torch.randint(3, vocab, (n,)).tolist()} for n in lengths]
    on = lambda batch: {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    # use_cache=False as SFTTrainer's compute_loss: with a cache transformers builds no packed mask
    cut = lambda rows: [rows[i:i + args.rows] for i in range(0, len(rows), args.rows)]
    pack, pad = (DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
                 DataCollatorForLanguageModeling(pad_token_id=0))
    packs = [on({**pack(rows), "use_cache": False}) for rows in cut(examples)]
    in_order = [on({**pad(rows), "use_cache": False}) for rows in cut(examples)]
    by_length = [on({**pad(rows), "use_cache": False})
                 for rows in cut(sorted(examples, key=lambda e: len(e["input_ids"])))]
    packed = packs[0]

    loss_whole, grads_whole = step(whole, packed)
    loss_rows, grads_rows = step(rows, packed)
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(grads_whole, grads_rows))
    settings = {"packed, SDPA over the whole pack": (whole, packs), "packed, within rows (finetune)": (rows, packs),
                "padded, rows sorted by length (length-grouped)": (whole, by_length),
                "padded, rows in order (random)": (whole, in_order)}
    seconds = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (model, batches) in settings.items():
            seconds[name].append(sum(timed(model, batch, args.device) for batch in batches))
    real = sum(lengths)
    print(f"{args.batches} batches of {args.rows} rows of {args.min_len}-{args.max_len} tokens ({real} tokens), "
          f"{args.device} {args.dtype}, "
          f"hidden {whole.config.hidden_size}, {whole.config.num_hidden_layers} layers, "
          f"{whole.config.num_local_experts} experts, {args.threads} thread(s), torch {torch.__version__}; "
          f"losses {loss_whole:.6f} / {loss_rows:.6f}, largest relative gradient difference {worst:.1e}")
    base = statistics.median(seconds["packed, within rows (finetune)"])
    print("| batch | tokens fed (real) | s (median) | vs within rows |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        fed, median = sum(b["input_ids"].numel() for b in settings[name][1]), statistics.median(values)
        print(f"| {name} | {fed:,} ({real:,}) | {median:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
