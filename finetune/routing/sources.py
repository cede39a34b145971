"""Turn data files into named text sources for the routing report (`finetune routing --data F ...`).

    sources = load_sources(["data/code.jsonl", "data/chat.parquet"], tokenizer=tokenizer)
    # {"code": [...texts...], "chat": [...]}

Each file is one source named after the file, unless its rows carry a `source` column, which
then names each row's source (one mixed file can hold several). Files: .jsonl, .json (a list of
rows) and .parquet. Rows may be, as TRL's data formats:
  messages                      a conversation, rendered with the tokenizer's chat template
  prompt + completion           strings joined, or message lists rendered together
  prompt + answer               test prompts with their expected answer, rendered like prompt + completion
  prompt + chosen + rejected    both prompt+chosen and prompt+rejected (the model sees both in DPO);
                                the prompt may be absent (implicit-prompt preference data)
  text                          used as is
Bad rows are collected and raised together as a UserError naming file, row and key.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data.files import read_rows
from finetune.errors import Problem, UserError

FORMATS = "`messages`, `prompt`+`completion`, `prompt`+`chosen`+`rejected`, or `text`"
MAX_PROBLEMS = 20


class _NoChatTemplate(Exception):
    """Conversational rows but no chat template: one error for the file, not one per row."""


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _join(prompt, response, tokenizer) -> str:
    """Prompt and response as the model sees them: a rendered conversation or plain concatenation."""
    if _is_conversation(response) or _is_conversation(prompt):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise _NoChatTemplate()
        return tokenizer.apply_chat_template(list(prompt or []) + list(response), tokenize=False)
    if not isinstance(response, str) or not isinstance(prompt or "", str):
        raise ValueError("expected strings or lists of {role, content} messages")
    return (prompt or "") + response


def render_row(row: dict, tokenizer=None) -> list[str]:
    """The text(s) the model would see for one data row (see the module docstring)."""
    if "messages" in row:
        return [_join(None, row["messages"], tokenizer)]
    if "chosen" in row and "rejected" in row:
        return [_join(row.get("prompt"), row[key], tokenizer) for key in ("chosen", "rejected")]
    if "prompt" in row and "completion" in row:
        return [_join(row["prompt"], row["completion"], tokenizer)]
    if "prompt" in row and "answer" in row:  # held-out test prompts (finetune eval's exact-match rows)
        answer = str(row["answer"])
        completion = [{"role": "assistant", "content": answer}] if _is_conversation(row["prompt"]) else answer
        return [_join(row["prompt"], completion, tokenizer)]
    if "text" in row:
        if not isinstance(row["text"], str):
            raise ValueError("`text` must be a string")
        return [row["text"]]
    raise KeyError(f"no {FORMATS} (keys: {', '.join(map(str, row)) or 'none'})")


def _source_names(paths: list[Path]) -> list[str]:
    """File stems, falling back to longer names where two files share a stem."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else str(p) for p in paths]


def load_sources(paths: list[str], source_column: str = "source", *, tokenizer=None) -> dict[str, list[str]]:
    """{source name: texts} from data files; see the module docstring for formats and naming."""
    files = [Path(p) for p in paths]
    problems = [Problem(str(p), "file not found") for p in files if not p.is_file()]
    if problems:
        raise UserError(problems)
    sources: dict[str, list[str]] = {}
    for path, name in zip(files, _source_names(files)):
        for item in read_rows(str(path)):  # the same reader as training: same formats, same row numbers
            row, where = item.value, f"{path}:{item.number}"
            if not isinstance(row, dict):
                problems.append(Problem(where, f"expected an object with {FORMATS}"))
                continue
            source = row.get(source_column)
            source = source if isinstance(source, str) and source else name
            try:
                sources.setdefault(source, []).extend(render_row(row, tokenizer))
            except _NoChatTemplate:
                what = "conversational rows need a tokenizer with a chat template (load_sources(..., tokenizer=))"
                raise UserError([Problem(where, what)]) from None
            except (KeyError, ValueError, TypeError) as err:
                problems.append(Problem(where, str(err).strip("'\"")))
            if len(problems) >= MAX_PROBLEMS:
                raise UserError(problems, title=f"first {MAX_PROBLEMS} problems")
    if problems:
        raise UserError(problems)
    if not sources:
        raise UserError([Problem(", ".join(map(str, files)), "no rows")])
    return sources
