"""Source formats: a row as data sets hold it (OpenAI messages, prompt/completion, ShareGPT, Alpaca,
preference pairs) -> the shape the converters take (finetune/data/convert.py), after the source's
column mapping (`columns: {format's name: the source's name}`).

    finetune validate R.yaml   # reads each local source's first rows: format detected, mapping checked
    finetune sft R.yaml        # finetune/data/prep.py shapes every row this way before converting it

`format: auto` picks, per source, the first format whose columns the source's first row has (the
order of DETECT); prep.py logs what it picked. messages and prompt_completion rows pass through
unchanged (the converters read either shape, as before formats existed); the others become those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finetune.data.rows import RowError
from finetune.errors import did_you_mean

KINDS = ("sft", "preference")
STAGE = {"sft": "SFT", "preference": "DPO"}

# ShareGPT's speaker names (`from`) -> chat roles. `tool` stays `tool`: the row checks
# (finetune/data/rows.py) name it as a role the trainers do not take, rather than guessing.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "tool": "tool"}

ALPACA_JOIN = "\n\n"
"""Between an Alpaca row's instruction and its (non-empty) input, in the one user turn."""


def _turns(items, what: str) -> list:
    """ShareGPT turns ({from, value}, or {role, content}) -> messages; one turn may be a bare mapping."""
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise RowError(f"`{what}` must be a non-empty list of {{from, value}} turns")
    out = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict):
            raise RowError(f"`{what}[{i}]` must be a mapping with `from` and `value`, got {turn!r:.60}")
        if "from" not in turn and "role" in turn and "content" in turn:
            out.append(turn)  # already a message: the row checks take it as it is
            continue
        if "from" not in turn or "value" not in turn:
            raise RowError(f"`{what}[{i}]` must have `from` and `value`; it has {', '.join(map(str, turn)) or 'nothing'}")
        role = ROLE_NAMES.get(turn["from"].lower()) if isinstance(turn["from"], str) else None  # GPT, Human too
        if role is None:
            raise RowError(f"`{what}[{i}].from` is `{turn['from']}`; expected one of {', '.join(ROLE_NAMES)}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _system(row: dict) -> list[dict]:
    system = row.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def _passthrough(row: dict, kind: str) -> dict:
    return row


def _messages(row: dict, kind: str) -> dict:
    """messages rows as before formats existed; `{from, value}` turns in them (a ShareGPT column mapped
    onto messages) become messages."""
    return {**row, "messages": _answer(row["messages"], "messages")} if _is_sharegpt(row.get("messages")) else row


def _sharegpt(row: dict, kind: str) -> dict:
    turns = _turns(row["conversations"], "conversations")
    if not (turns and turns[0].get("role") == "system"):
        turns = _system(row) + turns
    if kind == "sft":
        return {"messages": turns}
    return {"prompt": turns, "chosen": _answer(row["chosen"], "chosen"), "rejected": _answer(row["rejected"], "rejected")}


def _alpaca(row: dict, kind: str) -> dict:
    instruction, given = row["instruction"], row.get("input")
    if not isinstance(instruction, str) or (given is not None and not isinstance(given, str)):
        raise RowError("`instruction` and `input` must be strings")
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history):
        raise RowError("`history` must be a list of [instruction, answer] pairs")
    prompt = [*_system(row), *({"role": r, "content": t} for pair in history for r, t in zip(("user", "assistant"), pair)),
              {"role": "user", "content": instruction + (ALPACA_JOIN + given if given and given.strip() else "")}]
    if kind == "sft":
        return {"messages": [*prompt, {"role": "assistant", "content": row["output"]}]}
    return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


def _is_sharegpt(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0]


def _answer(value, what: str):
    """A preference answer: text, a message list as the converters take it, or ShareGPT turns."""
    return _turns(value, what) if isinstance(value, dict) or _is_sharegpt(value) else value


def _preference(row: dict, kind: str) -> dict:
    """prompt/chosen/rejected as before formats existed; ShareGPT-shaped turns in them become messages."""
    return {key: _answer(row[key], key) for key in ("prompt", "chosen", "rejected") if key in row}


@dataclass(frozen=True)
class Format:
    needs: dict[str, tuple[str, ...]]
    """Per stage kind, the columns a row must have (a kind absent here: not a format of that stage)."""
    optional: tuple[str, ...]
    shape: Callable[[dict, str], dict]


FORMATS = {
    "messages": Format({"sft": ("messages",)}, (), _messages),
    "prompt_completion": Format({"sft": ("prompt", "completion")}, (), _passthrough),
    "sharegpt": Format({"sft": ("conversations",), "preference": ("conversations", "chosen", "rejected")}, ("system",),
                       _sharegpt),
    "alpaca": Format({"sft": ("instruction", "output"), "preference": ("instruction", "chosen", "rejected")},
                     ("input", "system", "history"), _alpaca),
    "preference": Format({"preference": ("chosen", "rejected")}, ("prompt",), _preference),
}
# finetune/recipe/sources.py FORMATS lists these (and auto) as the recipe's choices; a test keeps them in step

DETECT = {"sft": ["messages", "sharegpt", "alpaca", "prompt_completion"], "preference": ["sharegpt", "alpaca", "preference"]}
"""format: auto tries these in order; the first whose columns the row has wins."""

COLUMNS = sorted({c for f in FORMATS.values() for c in (*(c for n in f.needs.values() for c in n), *f.optional)})
"""Every name `columns:` may map onto."""

# Common names of the columns in data sets seen in the wild, for the mapping an error suggests.
LIKELY = {
    "messages": ("conversation", "conversations", "dialog", "dialogue", "chat", "turns"),
    "prompt": ("question", "query", "instruction", "input", "problem", "text", "context"),
    "completion": ("answer", "response", "output", "solution", "target", "reply"),
    "chosen": ("preferred", "better", "winner", "chosen_response", "response_chosen"),
    "rejected": ("dispreferred", "worse", "loser", "rejected_response", "response_rejected"),
}


def detect(columns, kind: str) -> str | None:
    return next((name for name in DETECT[kind] if set(FORMATS[name].needs[kind]) <= set(columns)), None)


def map_columns(row: dict, mapping: dict) -> dict:
    """The row under the format's names: each mapped source column renamed (the others kept)."""
    if not mapping:
        return row
    missing = [(f, s) for f, s in mapping.items() if s not in row]
    if missing:
        raise RowError("; ".join(f"no column `{s}` (columns.{f}) in this row" for f, s in missing)
                       + f"; its columns: {', '.join(map(str, row))}")
    out = {k: v for k, v in row.items() if k not in mapping.values()}
    out.update({f: row[s] for f, s in mapping.items()})
    return out


def to_shape(value, fmt: str, mapping: dict, kind: str):
    """One row -> the shape convert.CONVERTERS[kind] takes; RowError when it does not fit its format."""
    if not isinstance(value, dict):
        raise RowError(f"expected a JSON object, got {type(value).__name__}")
    row = map_columns(value, mapping)
    if fmt == "auto":
        fmt = detect(row, kind)
        if fmt is None:  # the converter's own error names the keys it expected and found
            return row
    # messages, prompt_completion, preference: the converters name what a row lacks, as before formats
    missing = [c for c in FORMATS[fmt].needs[kind] if c not in row] if fmt in ("sharegpt", "alpaca") else []
    if missing:
        raise RowError(f"format {fmt} needs {', '.join(missing)}; found keys {', '.join(map(str, row))}")
    return FORMATS[fmt].shape(row, kind)


def suggestion(columns, kind: str) -> str:
    """The `columns:` mapping to write for a source whose columns match no format."""
    def likely(name):
        return next((c for c in columns if str(c).lower() in LIKELY[name]), f"<{name} column>")

    if kind == "sft":
        if any(str(c).lower() in LIKELY["messages"] for c in columns):
            return f"format: messages, columns: {{messages: {likely('messages')}}}"
        return f"format: prompt_completion, columns: {{prompt: {likely('prompt')}, completion: {likely('completion')}}}"
    return (f"format: preference, columns: {{prompt: {likely('prompt')}, chosen: {likely('chosen')}, "
            f"rejected: {likely('rejected')}}}")


def resolve(columns, fmt: str, mapping: dict, kind: str, label: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A source's format from the columns of its first row: (format, problems as (sub-key, what)).

    Checks what finetune validate and the preparation both check before any row is converted: every
    mapped column exists, `columns:` names only format columns, the format is one of the stage's and
    the row has its columns; format auto finds one or the problem names the mapping to write.
    columns None (a hub data set validate does not read): only what needs no row."""
    problems = []
    if fmt != "auto" and fmt in FORMATS and kind not in FORMATS[fmt].needs:
        return None, [("format", (f"`{fmt}` is not a {STAGE[kind]} format; {STAGE[kind]} formats: auto, "
                                  f"{', '.join(DETECT[kind])}"))]
    for f, s in mapping.items():
        if f not in COLUMNS:
            problems.append((f"columns.{f}", f"`{f}` is not a column of any format (they are {', '.join(COLUMNS)})"
                             + did_you_mean(str(f), COLUMNS)))
        elif columns is not None and s not in map(str, columns):
            problems.append((f"columns.{f}", f"no column `{s}` in {label} (columns found: {', '.join(map(str, columns))})"
                             + did_you_mean(str(s), [str(c) for c in columns])))
    if problems or columns is None or fmt not in (*FORMATS, "auto"):
        return None, problems
    columns = [str(c) for c in columns]
    mapped = [c for c in columns if c not in mapping.values()] + list(mapping)
    found = ", ".join(columns) or "none"
    if fmt == "auto":
        fmt = detect(mapped, kind)
        if fmt is None:
            formats = "; ".join(f"{n}: {', '.join(FORMATS[n].needs[kind])}" for n in DETECT[kind])
            return None, [("", (f"{label}: its columns ({found}) match no {STAGE[kind]} format ({formats}); say which "
                                f"columns hold what, e.g. {{path: {label}, {suggestion(columns, kind)}}}"))]
        return fmt, []
    missing = [c for c in FORMATS[fmt].needs[kind] if c not in mapped]
    if missing:
        return None, [("format", (f"format {fmt} needs the column(s) {', '.join(missing)}; {label} has {found}: map "
                                  f"them, e.g. columns: {{{', '.join(f'{m}: <column>' for m in missing)}}}"))]
    return fmt, []
