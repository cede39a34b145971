"""Perplexity of a text's later tokens as the context before them grows (the Mixtral paper's Figure 4, right).

    finetune eval MODEL_OR_RUN --long-ppl book.txt --contexts 512,1k,2k,4k

The text is tokenized once and cut into scored blocks of `score_tokens` tokens, the first one
starting after the longest context. For every context length c, each block is scored with
exactly the c tokens before it as its context (after a BOS token), so every context length
scores the same tokens and the curve compares like with like: each scored token sees between
c and c + score_tokens - 1 tokens before it. Contexts whose input would not fit the model's
configured context (max_position_embeddings) are reported as beyond context.

Memory stays bounded at long contexts: batch size 1, logits only for the scored positions
(`logits_to_keep`), and the log-softmax over the vocabulary taken a chunk of positions at a time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.errors import UserError
from finetune.eval.passkey import BEYOND, context_of


def read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--long-ppl {path}: file not found (give a plain text file, e.g. a long document)")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"--long-ppl {path}: the file is empty")
    return text


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Sum of -log p(target) over positions, for (T, V) logits, in float32 chunks of positions."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        part = logits[start:start + chunk].float()
        logp = torch.log_softmax(part, dim=-1).gather(-1, targets[start:start + chunk, None]).squeeze(-1)
        total -= logp.double().sum()
    return total


@torch.no_grad()
def block_nll(model, prefix: list[int], context: list[int], block: list[int]) -> float:
    """-log p(block | prefix + context), summed, with logits kept for the block's positions only."""
    ids = torch.tensor([prefix + context + block], device=model.device)
    n = len(block)
    # The logit predicting block[i] sits at the position before it: keep the last n + 1, drop the last.
    logits = model(input_ids=ids, logits_to_keep=n + 1, use_cache=False).logits[0, :-1]
    targets = ids[0, -n:]
    return token_nll(logits, targets).item()


def long_ppl(model, tokenizer, text: str, contexts: list[int], score_tokens: int = 128, max_blocks: int = 8) -> dict:
    """{"curve": [{"context", "status", "perplexity", "tokens"}], ...} for every requested context."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    limit = context_of(model)
    fits = [c for c in contexts if limit is None or len(prefix) + c + score_tokens <= limit]
    curve = [{"context": c, "status": "ok" if c in fits else BEYOND, "perplexity": None, "tokens": 0} for c in contexts]
    starts: list[int] = []
    if fits:
        longest = max(fits)
        starts = list(range(longest, len(ids) - score_tokens + 1, score_tokens))[:max_blocks]
        if not starts:
            raise UserError(
                f"--long-ppl: the text has {len(ids)} tokens; context {longest} needs at least {longest + score_tokens} "
                f"({longest} of context and {score_tokens} scored); give a longer text or shorter --contexts")
    bar = tqdm(total=len(fits) * len(starts), desc="long ppl", leave=False)
    for point in curve:
        if point["status"] != "ok":
            continue
        c, nll = point["context"], 0.0
        for start in starts:
            nll += block_nll(model, prefix, ids[start - c:start], ids[start:start + score_tokens])
            bar.update(1)
        point["tokens"] = score_tokens * len(starts)
        point["perplexity"] = math.exp(nll / point["tokens"])
        point["nll"] = nll / point["tokens"]
    bar.close()
    return {"context": limit, "score_tokens": score_tokens, "blocks": len(starts), "text_tokens": len(ids),
            "block_starts": starts, "curve": curve}


def markdown(results: dict, name: str, source: str) -> str:
    lines = [f"# Perplexity by context length: {name}", "",
             f"Text {source} ({results['text_tokens']} tokens); {results['blocks']} blocks of {results['score_tokens']} "
             f"scored tokens, the same tokens at every context length; configured context {results['context']} tokens.", "",
             "| context tokens | perplexity | scored tokens |", "|---|---|---|"]
    for point in results["curve"]:
        value = BEYOND if point["status"] != "ok" else f"{point['perplexity']:.3f}"
        lines.append(f"| {point['context']} | {value} | {point['tokens']} |")
    return "\n".join(lines) + "\n"
