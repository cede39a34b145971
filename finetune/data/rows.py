"""Row checks: a row's messages (or prompt/completion) as the trainers need them, or a RowError saying why not.

Message content is a string or a list of text parts (`[{"type": "text", "text": ...}]`, joined);
other part types are bad rows, named by type. The caller adds where (file and row number); with
`data.bad_rows: drop` a bad row is counted and skipped instead (finetune/data/prep.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from finetune.errors import Problem

ROLES = {"system", "user", "assistant"}


# Why a row was dropped, or changed and kept: counted per source (Report.count), logged, written to
# <run>/data_report.json and printed by `finetune data`. A new reason is just a new string.
MALFORMED = "malformed"                # a bad row (data.bad_rows)
TOO_LONG = "too long"                  # longer than data.max_length (data.too_long: error or drop)
PROMPT_TOO_LONG = "prompt fills max_length"  # DPO, data.too_long: truncate: TRL would drop it (no completion token left)
NO_TRAINED_TOKEN = "no trained token left"   # SFT, data.too_long: truncate: the cut left no assistant token
TRUNCATED = "truncated"                # kept, cut to data.max_length (SFT here; DPO by TRL's collator)
NOTES = "notes"
"""A converter's output key (optional): the reasons a kept row was changed (TRUNCATED, ...), counted per source."""


class RowError(Exception):
    """One row does not fit; the message says what, the caller adds where; `reason` is counted per source."""

    def __init__(self, message: str, reason: str = MALFORMED):
        super().__init__(message)
        self.reason = reason


@dataclass
class Report:
    rows: int = 0
    dropped: list[Problem] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    """Per source: where, format, usable rows, rows used (finetune/data/mixture.py), and the rows dropped
    and changed by reason ({"dropped": {reason: n}, "changed": {reason: n}}, Report.count); written as
    <run>/data_report.json `sources`."""
    system: dict[str, int] = field(default_factory=dict)
    """Rows whose system turn was kept, folded or dropped (data.system), by that word."""

    def count_system(self, counts: list[dict]) -> None:
        """Add what data.system did, as pyarrow's value_counts gives it: [{"values": action, "counts": n}]."""
        for item in counts:
            self.system[item["values"]] = self.system.get(item["values"], 0) + item["counts"]

    def count(self, where: str, group: str, reason: str, n: int = 1) -> None:
        """Add n rows of source `where` (e.g. data.train[0]) to `group` ("dropped" or "changed") under `reason`."""
        if n:
            record = next(s for s in self.sources if s["where"] == where)
            counts = record.setdefault(group, {})
            counts[reason] = counts.get(reason, 0) + n

    def tally(self, where: str, dropped: list[int], reasons: list[str], changed: list[int], notes: list[list[str]]):
        """Count a split's rows by source index and reason: dropped rows (one reason each), changed rows (their notes)."""
        for (source, reason), n in Counter(zip(dropped, reasons)).items():
            self.count(f"{where}[{source}]", "dropped", reason, n)
        for (source, reason), n in Counter((s, r) for s, rs in zip(changed, notes) for r in rs).items():
            self.count(f"{where}[{source}]", "changed", reason, n)

    def log(self, log) -> None:
        """One line per source (what it gave, what was dropped or changed, by reason), then the first dropped row."""
        for s in self.sources:
            extra = "".join(f"; {group}: " + ", ".join(f"{n} {reason}" for reason, n in s[group].items())
                            for group in ("dropped", "changed") if s.get(group))
            log.info("%s %s (%s): %d of %d usable rows used%s", s["where"], s["source"], s["format"], s["used"],
                     s["usable"], extra)
        if self.dropped:
            log.warning("dropped %d row(s) (data.bad_rows, data.too_long); first: %s", len(self.dropped), self.dropped[0])


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


def apply_system(messages: list[dict], how: str) -> tuple[list[dict], str | None]:
    """data.system on checked messages: keep the system turn, fold it into the first user turn (as
    Mistral's own templates do, after a blank line) or drop it; -> (messages, "kept"/"folded"/"dropped",
    or None when there is no system turn)."""
    if not messages or messages[0]["role"] != "system":
        return messages, None
    if how == "keep":
        return messages, "kept"
    if how == "drop":
        return messages[1:], "dropped"
    system, first, *rest = messages  # check_messages: a user turn follows the system turn
    return [{"role": "user", "content": system["content"] + "\n\n" + first["content"]}, *rest], "folded"


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
