"""Row checks: a row's messages (or prompt/completion) as the trainers need them, or a RowError saying why not.

Message content is a string or a list of text parts (`[{"type": "text", "text": ...}]`, joined);
other part types are bad rows, named by type. The caller adds where (file and row number); with
`data.bad_rows: drop` a bad row is counted and skipped instead (finetune/data/prep.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.errors import Problem

ROLES = {"system", "user", "assistant"}


class RowError(Exception):
    """One row does not fit; the message says what, the caller adds where."""


@dataclass
class Report:
    rows: int = 0
    dropped: list[Problem] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    """Per source: where, format, usable rows, rows used (finetune/data/prep.py; <run>/data_report.json `sources`)."""


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
