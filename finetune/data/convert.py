"""Converters: a row's JSON object -> what a stage's trainer takes (SFT: token ids and an assistant
mask; DPO: prompt/chosen/rejected, which TRL's DPOTrainer tokenizes), or a RowError.

finetune/data/prep.py runs the converter for the stage on every row in parallel (datasets.map).
"""

from __future__ import annotations

from finetune.data.masks import encode, render, tokenize_sft
from finetune.data.rows import (
    NO_TRAINED_TOKEN,
    NOTES,
    PROMPT_TOO_LONG,
    TOO_LONG,
    TRUNCATED,
    RowError,
    apply_system,
    as_messages,
    check_messages,
    sft_messages,
)
from finetune.data.templates import system_choice
from finetune.recipe import DataSection


def sft_converter(tokenizer, section: DataSection):
    """A row's JSON object -> {input_ids, assistant_masks (when assistant_only_loss), system (what
    data.system did)}; RowError when it does not fit."""
    how = system_choice(tokenizer, section.system)

    def convert(value: dict) -> dict:
        item, system = sft_messages(value), None
        if isinstance(item, list):
            item, system = apply_system(item, how)
        return {**fit_sft(tokenize_sft(tokenizer, item, section.assistant_only_loss), section), "system": system}

    return convert


def fit_sft(encoded: dict, section: DataSection) -> dict:
    """A tokenized SFT row within data.max_length, as data.too_long says: a RowError (too long: an error
    or dropped, the caller decides), or its first max_length tokens with their mask (keep_start, as
    TRL and LLaMA-Factory truncate): the prompt's start and as much of the answers as fits. In a
    conversation the turns before the cut stay whole, the one at the cut loses its end, later ones go;
    a row with no assistant token left is dropped (reason NO_TRAINED_TOKEN)."""
    n, limit = len(encoded["input_ids"]), section.max_length
    if n <= limit:
        return encoded
    if section.too_long != "truncate":
        raise RowError(f"{n} tokens, longer than data.max_length={limit}", TOO_LONG)
    out = {k: v[:limit] if k in ("input_ids", "assistant_masks") else v for k, v in encoded.items()}
    if "assistant_masks" in out and not any(out["assistant_masks"]):
        raise RowError(f"{n} tokens; its first data.max_length={limit} hold no assistant token", NO_TRAINED_TOKEN)
    return out | {NOTES: [*encoded.get(NOTES, []), TRUNCATED]}


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


def preference_row(value: dict, tokenizer, max_length: int, system: str = "keep", too_long: str = "drop") -> dict:
    """prompt/chosen/rejected, conversational or plain text, checked; chosen == rejected is an error.
    system: data.system as applied to the prompt's system turn (system_choice); too_long: data.too_long."""
    value = _split_implicit_prompt(value)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in value]
    if missing:
        raise RowError(f"missing {', '.join(missing)}; a preference row has prompt, chosen and rejected")
    prompt, chosen, rejected = value["prompt"], value["chosen"], value["rejected"]
    action = None
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if not all(x.strip() for x in (prompt, chosen, rejected)):
            raise RowError("prompt, chosen and rejected must be non-empty")
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        prompt, action = apply_system(check_messages(as_messages(prompt, "user", "prompt"), "prompt", last_role="user"), system)
        chosen = check_messages(prompt + as_messages(chosen, "assistant", "chosen"), "prompt+chosen")[len(prompt):]
        rejected = check_messages(prompt + as_messages(rejected, "assistant", "rejected"), "prompt+rejected")[len(prompt):]
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if out["chosen"] == out["rejected"]:
        raise RowError("chosen equals rejected: the pair teaches nothing")
    prompt_length, longest = trl_lengths(tokenizer, out, prompt=too_long == "truncate")
    if too_long == "truncate":
        # DPOConfig.max_length is data.max_length (train/args.py) with TRL's keep_start: its collator
        # cuts longer rows, and its _prepare_dataset filters out rows whose prompt alone fills
        # max_length. Those are dropped here, so that they are counted, and TRL's filter finds none.
        if prompt_length >= max_length:
            raise RowError(f"the prompt alone is {prompt_length} tokens, data.max_length={max_length}: no completion "
                           "token would be left", PROMPT_TOO_LONG)
        return out | {"system": action} | ({NOTES: [*value.get(NOTES, []), TRUNCATED]} if longest > max_length else {})
    if longest > max_length:
        raise RowError(f"{longest} tokens, longer than data.max_length={max_length}", TOO_LONG)
    return {**out, "system": action}


def trl_lengths(tokenizer, row: dict, prompt: bool = True) -> tuple[int | None, int]:
    """(prompt tokens, or None unless asked; longest prompt+completion in tokens) as TRL's DPOTrainer sees the row (trl_ids)."""
    prompt_length, full = trl_ids(tokenizer, row, prompt)
    return prompt_length, max(len(f) for f in full)


def trl_ids(tokenizer, row: dict, prompt: bool = True) -> tuple[int | None, list[list[int]]]:
    """(prompt tokens, [prompt+chosen ids, prompt+rejected ids]) as TRL 1.16's
    DPOTrainer._prepare_dataset tokenizes the row: plain-text completions get the EOS token and the
    texts the tokenizer's special tokens (its `_tokenize`: tokenizer(text)); a conversation is
    apply_chat_template(tokenize=True), which is tokenizer(rendered, add_special_tokens=False), the
    prompt rendered with the generation prompt (here masks.render and masks.encode, half the time of
    the tokenize=True call, measured); the completion starts where the prompt and prompt+completion
    tokens diverge (TRL's common_prefix_length). So the length checked is the length trained;
    TRL's collator then keeps the first max_length tokens of each. tests/unit/data/test_too_long.py
    runs TRL's own preparation on the same rows. prompt=False: the lengths only (a render less)."""
    from trl.data_utils import common_prefix_length  # trl costs seconds to import: only preference rows need it

    text = isinstance(row["prompt"], str)
    if text:
        eos = tokenizer.eos_token
        full = [tokenizer(row["prompt"] + (c if c.endswith(eos) else c + eos))["input_ids"]
                for c in (row["chosen"], row["rejected"])]
    else:
        full = [encode(tokenizer, render(tokenizer, row["prompt"] + row[c]))[0] for c in ("chosen", "rejected")]
    if not prompt:
        return None, full
    ids = (tokenizer(row["prompt"])["input_ids"] if text
           else encode(tokenizer, render(tokenizer, row["prompt"], add_generation_prompt=True))[0])
    return min(common_prefix_length(ids, f) for f in full), full


def preference_converter(tokenizer, section: DataSection):
    """A row's JSON object -> {prompt, chosen, rejected} (TRL's DPOTrainer tokenizes them); RowError when it does not fit."""
    how = system_choice(tokenizer, section.system)
    return lambda value: preference_row(value, tokenizer, section.max_length, how, section.too_long)


# What each stage kind turns a row into. finetune/data/prep.py runs the converter on every row in
# parallel (datasets.map); a new source format (ShareGPT, Alpaca, column mappings) is a function
# from its row to the messages or prompt/completion shape, applied before the converter.
CONVERTERS = {"sft": sft_converter, "preference": preference_converter}


def convert_row(convert, value) -> dict:
    if not isinstance(value, dict):
        raise RowError(f"expected a JSON object, got {type(value).__name__}")
    return convert(value)
