"""SFT tokenization: a conversation rendered with the chat template, and its assistant mask.

The character spans of the assistant turns come from finetune/data/templates.py (located in the
rendering of the whole conversation, for any template); here they become a token mask.
"""

from __future__ import annotations

import itertools

import numpy as np

from finetune.data.rows import RowError
from finetune.data.templates import assistant_spans, render


def encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, as tokenizer(text, add_special_tokens=False) gives them.
    A fast tokenizer without truncation, padding or split special tokens is called directly: what
    transformers' __call__ does then too, without its per-call work (half the encoding time, measured)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None and not backend.encode_special_tokens:
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_sft(tokenizer, item, assistant_only: bool, from_turn: int = 0) -> dict:
    if isinstance(item, tuple):  # plain text: no template, loss on the completion
        prompt, completion = item
        text = (tokenizer.bos_token or "") + prompt + completion + tokenizer.eos_token
        spans = [(len(tokenizer.bos_token or "") + len(prompt), len(text))]
    elif assistant_only:
        text, spans = assistant_spans(tokenizer, item, from_turn)
    else:  # no mask: the spans (one more render per conversation) are not needed
        text, spans = render(tokenizer, item), []
    ids, offsets = encode(tokenizer, text)
    out = {"input_ids": ids}
    if assistant_only:
        # a token is trained when its characters overlap an assistant span; numpy, because a
        # Python loop over every token and span was a third of the preparation time
        offsets = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
        mask = np.zeros(len(offsets), dtype=bool)
        for start, end in spans:
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        if not mask.any():
            raise RowError("no assistant token left to train on")
        out["assistant_masks"] = mask.astype(np.int64).tolist()
    return out
