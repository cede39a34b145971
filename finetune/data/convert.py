"""Converters: a row's JSON object -> what a stage's trainer takes (SFT: token ids and an assistant
mask; DPO: prompt/chosen/rejected, which TRL's DPOTrainer tokenizes), or a RowError.

finetune/data/prep.py runs the converter for the stage on every row in parallel (datasets.map).
"""

from __future__ import annotations

from finetune.data.masks import encode, render, tokenize_sft
from finetune.data.rows import RowError, apply_system, as_messages, check_messages, sft_messages
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
        encoded = tokenize_sft(tokenizer, item, section.assistant_only_loss)
        if len(encoded["input_ids"]) > section.max_length:
            raise RowError(f"{len(encoded['input_ids'])} tokens, longer than data.max_length={section.max_length}")
        return {**encoded, "system": system}

    return convert


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


def preference_row(value: dict, tokenizer, max_length: int, system: str = "keep") -> dict:
    """prompt/chosen/rejected, conversational or plain text, checked; chosen == rejected is an error.
    system: data.system as applied to the prompt's system turn (system_choice)."""
    value = _split_implicit_prompt(value)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in value]
    if missing:
        raise RowError(f"missing {', '.join(missing)}; a preference row has prompt, chosen and rejected")
    prompt, chosen, rejected = value["prompt"], value["chosen"], value["rejected"]
    action = None
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if not all(x.strip() for x in (prompt, chosen, rejected)):
            raise RowError("prompt, chosen and rejected must be non-empty")
        texts = [prompt + chosen, prompt + rejected]
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        prompt, action = apply_system(check_messages(as_messages(prompt, "user", "prompt"), "prompt", last_role="user"), system)
        chosen = check_messages(prompt + as_messages(chosen, "assistant", "chosen"), "prompt+chosen")[len(prompt):]
        rejected = check_messages(prompt + as_messages(rejected, "assistant", "rejected"), "prompt+rejected")[len(prompt):]
        texts = [render(tokenizer, prompt + chosen), render(tokenizer, prompt + rejected)]
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if out["chosen"] == out["rejected"]:
        raise RowError("chosen equals rejected: the pair teaches nothing")
    longest = max(len(encode(tokenizer, t)[0]) for t in texts)
    if longest > max_length:
        raise RowError(f"{longest} tokens, longer than data.max_length={max_length}")
    return {**out, "system": action}


def preference_converter(tokenizer, section: DataSection):
    """A row's JSON object -> {prompt, chosen, rejected} (TRL's DPOTrainer tokenizes them); RowError when it does not fit."""
    how = system_choice(tokenizer, section.system)
    return lambda value: preference_row(value, tokenizer, section.max_length, how)


# What each stage kind turns a row into. finetune/data/prep.py runs the converter on every row in
# parallel (datasets.map); a new source format (ShareGPT, Alpaca, column mappings) is a function
# from its row to the messages or prompt/completion shape, applied before the converter.
CONVERTERS = {"sft": sft_converter, "preference": preference_converter}


def convert_row(convert, value) -> dict:
    if not isinstance(value, dict):
        raise RowError(f"expected a JSON object, got {type(value).__name__}")
    return convert(value)
