"""Can the bundled tiny architecture learn to copy a key from earlier in its context, and how fast?

    python bench/induction_probe.py --task fixed --steps 300       # control: the copy sits at a fixed offset
    python bench/induction_probe.py --task anchored --steps 600    # the passkey's shape: the copy must be found by content
    python bench/induction_probe.py --task anchored --kv-heads 8 --lr 1e-3   # variants of the model / optimizer
    python bench/induction_probe.py --task anchored --span 6 --lr 1e-3 --steps 1500   # short rows
    python bench/induction_probe.py --task anchored --span 6 --then-span 40 --switch-step 700 --lr 1e-3 --steps 1300
    python bench/induction_probe.py --task passkey --span 5 --then-span 40 --switch-step 700 --lr 1e-3 --steps 1200

Passkey retrieval (finetune eval --passkey) needs a model that copies a number it saw earlier at
an unknown distance (an "induction" circuit). This trains a fresh random model of model/tiny-moe's
shape (build_tiny_moe.MODEL, overridable) from scratch on synthetic rows and prints the loss on
the copied digits every 25 steps against chance (ln 10 = 2.303 nats per digit):

  fixed     <s> 30 digits, 20 random tokens, the same 30 digits: always 50 tokens back, so
            attention by relative position suffices.
  anchored  <s> F random tokens, A, 5 digits, 1.5 S - F random tokens, A, the same 5 digits,
            with F uniform in 0..S-1 (S = --span, 40 by default: 72-token rows) and A one marker
            token: the passkey's shape (the key follows the same words both times), found only
            by content.
  passkey   the eval's passkey prompt in prose (finetune/eval/passkey.py user_turn: 0..S filler
            words, the key sentence at a random depth, the question) then "The pass key is
            KEY.", in model/tiny-moe's tokens, right-padded; the loss is on the answer's digits,
            and at the end greedy retrieval is counted on 12 fresh keys per filler length.

Same optimizer as the build (AdamW 0.9/0.95, weight decay 0.1, grad clip 1.0, no warmup), batch
16, one thread, seed 0, CPU. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch

BUILD = Path(__file__).resolve().parent.parent / "model" / "build_tiny_moe.py"
VOCAB = 1005
DIGITS = torch.arange(900, 910)  # ten token ids standing for the digits
FILLER = (300, 800)  # random filler token ids
MARKER = 5


def build_module():
    spec = importlib.util.spec_from_file_location("build_tiny_moe", BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(task: str, size: int, generator, span: int = 40) -> tuple[torch.Tensor, int]:
    """Rows of one task and the number of copied digits at the end of each row."""
    bos = torch.ones(1, dtype=torch.long)
    rows = []
    for _ in range(size):
        if task == "fixed":
            seq = DIGITS[torch.randint(0, 10, (30,), generator=generator)]
            rows.append(torch.cat([bos, seq, torch.randint(*FILLER, (20,), generator=generator), seq]))
        else:
            seq = DIGITS[torch.randint(0, 10, (5,), generator=generator)]
            before = int(torch.randint(0, span, (), generator=generator))
            mark = torch.tensor([MARKER])
            rows.append(torch.cat([bos, torch.randint(*FILLER, (before,), generator=generator), mark, seq,
                                   torch.randint(*FILLER, (span + span // 2 - before,), generator=generator), mark, seq]))
    return torch.stack(rows), (30 if task == "fixed" else 5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("fixed", "anchored", "passkey"), default="anchored")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3, help="the build's peak rate by default")
    parser.add_argument("--span", type=int, default=40, help="anchored: filler before the key is 0..span-1 tokens")
    parser.add_argument("--then-span", type=int, help="a curriculum: --span until --switch-step, then this span")
    parser.add_argument("--switch-step", type=int, default=0)
    parser.add_argument("--kv-heads", type=int, help="num_key_value_heads (the build uses 2)")
    parser.add_argument("--heads", type=int, help="num_attention_heads (the build uses 8)")
    args = parser.parse_args()

    build = build_module()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shape = dict(build.MODEL)
    if args.heads:
        shape["num_attention_heads"] = args.heads
    if args.kv_heads:
        shape["num_key_value_heads"] = args.kv_heads
    tok = None
    if args.task == "passkey":
        import random

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(BUILD.parent / "tiny-moe")
        rng = random.Random(0)
    vocab = len(tok) if tok else VOCAB
    model = build.MixtralForCausalLM(build.MixtralConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **shape))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    print(f"task {args.task} (span {args.span}), {args.steps} steps, lr {args.lr}, heads {shape['num_attention_heads']}, "
          f"kv heads {shape['num_key_value_heads']}; chance {math.log(10):.3f} nats per copied digit")
    start, recent = time.time(), []
    for step in range(args.steps):
        span = args.then_span if args.then_span and step >= args.switch_step else args.span
        if args.then_span and step == args.switch_step:
            print(f"span {args.then_span} from here on", flush=True)
        if tok:
            x, y, answers = build.passkey_batch(tok, 16, rng, span)
            out = model(input_ids=x, labels=y)
            rows = torch.arange(len(x))[:, None]
            copied = torch.nn.functional.cross_entropy(out.logits[rows, answers - 1].reshape(-1, vocab),
                                                       x[rows, answers].reshape(-1))
        else:
            x, n = batch(args.task, 16, generator, span)
            out = model(input_ids=x, labels=x)
            copied = torch.nn.functional.cross_entropy(out.logits[:, -n - 1:-1].reshape(-1, VOCAB), x[:, -n:].reshape(-1))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [copied.item()])[-25:]
        if (step + 1) % 25 == 0:
            print(f"step {step + 1:5d}  copied-digit loss (mean of last 25) {sum(recent) / len(recent):.3f}  "
                  f"{time.time() - start:6.1f}s", flush=True)
    print(f"final copied-digit loss {sum(recent) / len(recent):.3f} (chance {math.log(10):.3f})")
    if tok:
        for words in (3, 10, 40, 100):
            n_tokens = len(tok(__import__("finetune.eval.passkey", fromlist=["user_turn"]).user_turn("12345", words, 0.5))["input_ids"])
            print(f"greedy retrieval, {words} filler words (~{n_tokens} tokens): {build.prose_retrieval(model, tok, words, seed='probe')}/12", flush=True)


if __name__ == "__main__":
    main()
