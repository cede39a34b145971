"""Data: check each row (read by finetune/datafiles.py) and shape the rows for the trainers.

Message content is a string or a list of text parts (`[{"type": "text", "text": ...}]`, joined);
other part types are bad rows, named by type.

SFT rows (`messages`, or `prompt`/`completion`) are tokenized here with the chat template and an
assistant mask. TRL's own assistant-only loss needs `{% generation %}` markers that Mixtral's
template (and most hub templates) lack, so the mask is computed by rendering each conversation
prefix and mapping character spans to tokens: it works with any prefix-preserving template.
Preference rows are checked and normalised here and tokenized by TRL's DPOTrainer.

Every bad row is reported with its file and row number; `data.bad_rows: drop` skips them instead.
finetune/dataprep.py runs these row functions over whole data sets with `datasets` and caches the result.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from finetune.datafiles import LOCAL_SUFFIXES, Row, count_rows, read_rows  # noqa: F401 (re-exported)
from finetune.errors import Problem, UserError
from finetune.recipe import DataSection

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


class RowError(Exception):
    """One row does not fit; the message says what, the caller adds where."""


@dataclass
class Report:
    rows: int = 0
    dropped: list[Problem] = field(default_factory=list)


# ---------------------------------------------------------------- row checks

def message_text(content, what: str) -> str:
    """A message's content as text: a string, or a list of text parts (the OpenAI/transformers
    multimodal shape, common in chat data) joined with newlines, as vLLM joins them."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content, start=1):
            if not isinstance(part, dict) or "type" not in part:
                raise RowError(f"`{what}` part {j} must be a mapping with `type` and `text`, got {part!r:.60}")
            if part["type"] != "text":
                raise RowError(f"`{what}` part {j} has type `{part['type']}`; only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise RowError(f"`{what}` part {j} is a text part without a string `text`")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise RowError(f"`{what}` must be a string or a list of text parts, got {type(content).__name__}")
    if not text.strip():
        raise RowError(f"`{what}` is empty")
    return text


def check_messages(messages, what: str = "messages", last_role: str | None = "assistant") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"`{what}` must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"`{what}[{i}]` must have `role` and `content`")
        if m["role"] not in ROLES:
            raise RowError(f"`{what}[{i}].role` is `{m['role']}`; expected one of system, user, assistant")
        out.append({"role": m["role"], "content": message_text(m["content"], f"{what}[{i}].content")})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError(f"`{what}`: roles must alternate user/assistant (after an optional system); turn {i + 1} is {m['role']}")
    if last_role and turns and turns[-1]["role"] != last_role:
        raise RowError(f"`{what}` must end with a {last_role} message")
    return out


def as_messages(value, role: str, what: str) -> list:
    """A string stands for one message of `role`; a list is messages (checked by check_messages)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise RowError(f"`{what}` must be a string or a list of messages, got {type(value).__name__}")


def sft_messages(row: dict) -> list[dict] | tuple[str, str]:
    """Conversational rows -> messages; plain-text prompt/completion -> (prompt, completion)."""
    if "messages" in row:
        return check_messages(row["messages"])
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not prompt.strip() or not completion.strip():
                raise RowError("`prompt` and `completion` must be non-empty")
            return prompt, completion
        return check_messages(as_messages(prompt, "user", "prompt") + as_messages(completion, "assistant", "completion"))
    raise RowError(f"expected `messages` or `prompt` + `completion`; found keys {sorted(row)}")


# ---------------------------------------------------------------- SFT tokenization

def _render(tokenizer, messages, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as exc:  # jinja raise_exception() and template errors
        raise RowError(f"the chat template rejects this conversation: {exc}") from None


def assistant_spans(tokenizer, messages: list[dict], from_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (with their end token).

    from_turn skips the turns before it (a preference prompt's own assistant turns are context).
    """
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < from_turn:
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(before):
            before = _render(tokenizer, messages[:i])
        # the whole conversation ends with its last turn: the same render as `full`, not done twice
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise UserError(
                "the chat template is not prefix-preserving (rendering a conversation's first turns is not a prefix of "
                "rendering all of it), so assistant-only loss cannot be located; set data.assistant_only_loss: false "
                "or give model.chat_template a prefix-preserving template"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
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
        text, spans = _render(tokenizer, item), []
    ids, offsets = _encode(tokenizer, text)
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


def sft_converter(tokenizer, section: DataSection):
    """A row's JSON object -> {input_ids, assistant_masks (when assistant_only_loss)}; RowError when it does not fit."""
    def convert(value: dict) -> dict:
        encoded = tokenize_sft(tokenizer, sft_messages(value), section.assistant_only_loss)
        if len(encoded["input_ids"]) > section.max_length:
            raise RowError(f"{len(encoded['input_ids'])} tokens, longer than data.max_length={section.max_length}")
        return encoded

    return convert


# ---------------------------------------------------------------- preference rows

def _split_implicit_prompt(value: dict) -> dict:
    """Hub preference sets (UltraFeedback) repeat the prompt inside chosen/rejected; keep it once."""
    chosen, rejected = value.get("chosen"), value.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return value
    prompt = value.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:  # no prompt column: the shared leading turns are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt = chosen[:shared]
    n = len(prompt)
    if n and chosen[:n] == prompt and rejected[:n] == prompt:
        return {**value, "prompt": prompt, "chosen": chosen[n:], "rejected": rejected[n:]}
    return value if "prompt" in value else {**value, "prompt": prompt}


def preference_row(value: dict, tokenizer, max_length: int) -> dict:
    """prompt/chosen/rejected, conversational or plain text, checked; chosen == rejected is an error."""
    value = _split_implicit_prompt(value)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in value]
    if missing:
        raise RowError(f"missing {', '.join(missing)}; a preference row has prompt, chosen and rejected")
    prompt, chosen, rejected = value["prompt"], value["chosen"], value["rejected"]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if not all(x.strip() for x in (prompt, chosen, rejected)):
            raise RowError("prompt, chosen and rejected must be non-empty")
        texts = [prompt + chosen, prompt + rejected]
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        prompt = check_messages(as_messages(prompt, "user", "prompt"), "prompt", last_role="user")
        chosen = check_messages(prompt + as_messages(chosen, "assistant", "chosen"), "prompt+chosen")[len(prompt):]
        rejected = check_messages(prompt + as_messages(rejected, "assistant", "rejected"), "prompt+rejected")[len(prompt):]
        texts = [_render(tokenizer, prompt + chosen), _render(tokenizer, prompt + rejected)]
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if out["chosen"] == out["rejected"]:
        raise RowError("chosen equals rejected: the pair teaches nothing")
    longest = max(len(_encode(tokenizer, t)[0]) for t in texts)
    if longest > max_length:
        raise RowError(f"{longest} tokens, longer than data.max_length={max_length}")
    return out


def preference_converter(tokenizer, section: DataSection):
    """A row's JSON object -> {prompt, chosen, rejected} (TRL's DPOTrainer tokenizes them); RowError when it does not fit."""
    return lambda value: preference_row(value, tokenizer, section.max_length)


# What each stage kind turns a row into. finetune/dataprep.py runs the converter on every row in
# parallel (datasets.map); a new source format (ShareGPT, Alpaca, column mappings) is a function
# from its row to the messages or prompt/completion shape, applied before the converter.
CONVERTERS = {"sft": sft_converter, "preference": preference_converter}


def convert_row(convert, value) -> dict:
    if not isinstance(value, dict):
        raise RowError(f"expected a JSON object, got {type(value).__name__}")
    return convert(value)
