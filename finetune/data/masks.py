"""SFT tokenization: a conversation rendered with the chat template, and its assistant mask.

TRL's own assistant-only loss needs `{% generation %}` markers that Mixtral's template (and most
hub templates) lack, so the mask is computed here by rendering each conversation prefix and mapping
character spans to tokens: it works with any prefix-preserving template.
"""

from __future__ import annotations

import itertools

import numpy as np

from finetune.data.rows import RowError
from finetune.errors import UserError


def render(tokenizer, messages, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as exc:  # jinja raise_exception() and template errors
        raise RowError(f"the chat template rejects this conversation: {exc}") from None


def assistant_spans(tokenizer, messages: list[dict], from_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (with their end token).

    from_turn skips the turns before it (a preference prompt's own assistant turns are context).
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < from_turn:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(before):
            before = render(tokenizer, messages[:i])
        # the whole conversation ends with its last turn: the same render as `full`, not done twice
        through = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise UserError(
                "the chat template is not prefix-preserving (rendering a conversation's first turns is not a prefix of "
                "rendering all of it), so assistant-only loss cannot be located; set data.assistant_only_loss: false "
                "or give model.chat_template a prefix-preserving template"
            )
        spans.append((len(before), len(through)))
    return full, spans


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
    else:  # no mask: the spans (two more renders per assistant turn) are not needed
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
