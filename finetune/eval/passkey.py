"""Passkey retrieval by prompt length and key depth (the Mixtral paper's Figure 4, left).

    finetune eval MODEL_OR_RUN --passkey --lengths 1k,2k,4k --depths 0,0.25,0.5,0.75,1 --trials 4

A random number (the key) is hidden in a filler text at a relative depth; the user turn of the
model's own chat template holds the filler, the key sentence and the question, and the greedy
answer must be the key exactly. Lengths are counted in the model's tokens over the whole
rendered prompt (template included) and hit the target within a few tokens (one filler word).
A length whose prompt plus answer does not fit the model's configured context
(max_position_embeddings) is reported as beyond context, never truncated. Keys come from a
generator seeded by (seed, length, depth, trial), so a grid is the same on every run.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from finetune.errors import UserError
from finetune.modeling import text_config

# The filler and phrasing of the passkey tests in the long-context literature (Landmark
# Attention, LongLoRA), which the Mixtral paper's test follows.
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
BEYOND = "beyond context"


def user_turn(key: str, n_words: int, depth: float) -> str:
    """INTRO, n_words of filler with the key sentence at the sentence boundary nearest depth, QUESTION."""
    sentences = FILLER.split(". ")
    sentences = [s if s.endswith(".") else s + "." for s in sentences]
    words: list[str] = []
    boundaries = [0]  # word indices where a sentence starts
    while len(words) < n_words:
        for sentence in sentences:
            words += sentence.split()
            boundaries.append(len(words))
    words = words[:n_words]
    boundaries = [b for b in boundaries if b <= n_words]
    if boundaries[-1] != n_words:
        boundaries.append(n_words)
    target = depth * n_words
    at = min(boundaries, key=lambda b: (abs(b - target), b))
    parts = [INTRO, " ".join(words[:at]), KEY_SENTENCE.format(key=key), " ".join(words[at:]), QUESTION]
    return " ".join(p for p in parts if p)


def render(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def count_tokens(tokenizer, text: str) -> int:
    # The rendered template carries its own special tokens (<s>), as in generation.
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer, length: int, depth: float, key: str) -> dict:
    """The longest prompt of at most `length` tokens: {"text", "tokens", "key", "depth", "filler_words"}.

    Binary search on the number of filler words; token counts grow with words (one word is a
    few tokens), so the result is within one word of the target.
    """
    def size(n):
        return count_tokens(tokenizer, render(tokenizer, user_turn(key, n, depth)))

    if size(0) > length:
        raise UserError(f"--lengths {length}: the passkey prompt needs {size(0)} tokens before any filler; choose longer lengths")
    lo, hi = 0, max(length, 1)  # a word is at least one token, so `length` words are too many
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    text = render(tokenizer, user_turn(key, lo, depth))
    return {"text": text, "tokens": count_tokens(tokenizer, text), "key": key, "depth": depth, "filler_words": lo}


def make_key(seed: int, length: int, depth: float, trial: int, digits: int = 5) -> str:
    rng = random.Random(f"passkey-{seed}-{length}-{depth}-{trial}")
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def context_of(model) -> int | None:
    return getattr(text_config(model.config), "max_position_embeddings", None)


@torch.no_grad()
def greedy_answers(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of a batch of rendered prompts (left-padded, so every prompt ends at the right edge)."""
    tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out[:, enc["input_ids"].shape[1]:]]


def score(answer: str, key: str) -> bool:
    """Exact retrieval: the whole stripped answer is the key (a trailing full stop allowed)."""
    return answer.strip().rstrip(".").strip() == key


def passkey_grid(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 4, seed: int = 0,
                 digits: int = 5, max_new_tokens: int = 16, batch_size: int = 8, token_budget: int = 32768) -> dict:
    """Accuracy per (length, depth) cell; cells that do not fit the context say so.

    A batch holds at most token_budget prompt tokens (and at most batch_size prompts), so
    memory stays bounded at long lengths: one prompt per batch from 32k tokens up by default.
    """
    context = context_of(model)
    cells = []
    jobs = []
    for length in lengths:
        fits = context is None or length + max_new_tokens <= context
        for depth in depths:
            cell = {"length": length, "depth": depth, "status": "ok" if fits else BEYOND,
                    "accuracy": None, "n": 0, "tokens": [], "samples": []}
            cells.append(cell)
            if fits:
                for trial in range(trials):
                    jobs.append((cell, build_prompt(tokenizer, length, depth, make_key(seed, length, depth, trial, digits))))
    hits = {}
    bar = tqdm(total=len(jobs), desc="passkey", leave=False)
    by_length: dict[int, list] = {}
    for cell, prompt in jobs:
        by_length.setdefault(cell["length"], []).append((cell, prompt))
    for length, group in by_length.items():
        size = max(1, min(batch_size, token_budget // max(length, 1)))
        for start in range(0, len(group), size):
            batch = group[start:start + size]
            answers = greedy_answers(model, tokenizer, [p["text"] for _, p in batch], max_new_tokens)
            for (cell, prompt), answer in zip(batch, answers):
                ok = score(answer, prompt["key"])
                key = (cell["length"], cell["depth"])
                hits[key] = hits.get(key, 0) + ok
                cell["n"] += 1
                cell["tokens"].append(prompt["tokens"])
                if len(cell["samples"]) < 2:
                    cell["samples"].append({"key": prompt["key"], "got": answer})
            bar.update(len(batch))
    bar.close()
    for cell in cells:
        if cell["status"] == "ok":
            cell["accuracy"] = hits.get((cell["length"], cell["depth"]), 0) / max(cell["n"], 1)
    scored = [c for c in cells if c["status"] == "ok"]
    return {
        "context": context, "lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
        "digits": digits, "cells": cells,
        "accuracy": sum(c["accuracy"] for c in scored) / len(scored) if scored else None,
    }


def lookup(results: dict, length: int, depth: float) -> dict:
    return next(c for c in results["cells"] if c["length"] == length and c["depth"] == depth)


def accuracy_by_length(results: dict) -> dict[int, float | None]:
    """Mean accuracy over the depths of each length; None for a length beyond the context."""
    out = {}
    for length in results["lengths"]:
        cells = [c for c in results["cells"] if c["length"] == length]
        out[length] = None if cells[0]["status"] != "ok" else sum(c["accuracy"] for c in cells) / len(cells)
    return out


def markdown(results: dict, name: str) -> str:
    """Accuracy table: one row per depth, one column per length."""
    head = "| depth \\ length | " + " | ".join(str(n) for n in results["lengths"]) + " |"
    lines = [f"# Passkey retrieval: {name}", "",
             f"Greedy answers, exact key ({results['digits']} digits), {results['trials']} trials per cell, "
             f"seed {results['seed']}; configured context {results['context']} tokens.", "",
             head, "|" + "---|" * (len(results["lengths"]) + 1)]
    for depth in results["depths"]:
        row = []
        for length in results["lengths"]:
            cell = lookup(results, length, depth)
            row.append(BEYOND if cell["status"] != "ok" else f"{cell['accuracy']:.2f}")
        lines.append(f"| {depth:g} | " + " | ".join(row) + " |")
    overall = results["accuracy"]
    lines += ["", f"mean accuracy over the cells within context: {'n/a' if overall is None else f'{overall:.3f}'}"]
    return "\n".join(lines) + "\n"


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--depths {text}: expected comma-separated fractions between 0 and 1, e.g. 0,0.25,0.5,0.75,1") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths {text}: every depth is a fraction between 0 (start) and 1 (end), e.g. 0,0.5,1")
    return depths


def default_lengths(context: int | None, max_new_tokens: int = 16) -> list[int]:
    """context/8, /4, /2 and the longest prompt that fits, plus twice the context (beyond)."""
    if not context:
        return [1024, 2048, 4096, 8192]
    return [context // 8, context // 4, context // 2, context - max_new_tokens, 2 * context]
