"""What a chat template does with a conversation: where each assistant turn lies in the rendering of the
whole conversation (assistant-only loss), and whether the template takes a system turn (data.system: auto).

    finetune sft recipes/qwen3-30b-a3b/sft.yaml    # masks the assistant turns of every row while preparing the data

Assistant turns are located in ONE rendering of the whole conversation, never in renderings of its
prefixes: hub templates are often not prefix-preserving (Qwen3 writes an empty think block into the
last assistant turn only; gpt-oss ends the last turn with <|return|>, the others with <|end|>).
TRL's own assistant-only loss needs `{% generation %}` markers that hub templates lack, hence this code.

How: render the conversation again with every assistant content wrapped in private-use marker
characters; the markers give the spans, and the rendering with the markers removed must equal the
real one, or the spans are not trusted. A template that rewrites content (strips or trims it) fails
that check; then each content is replaced by a marker and the template text between the markers is
matched against the real rendering: what stands in a content's place must be that content, up to
surrounding whitespace. Neither working is a RowError naming the turn, never a guessed mask.

What is trained in an assistant turn: its content as rendered, and the special token that follows it
directly or after spaces (the end of turn: <|im_end|>, </s>, <|eot|>, <|end|>/<|return|>, <|end_of_text|>, ...).
Text the template writes into the turn around the content (the header, Qwen3's `<think>\n\n</think>\n\n`,
harmony's `<|channel|>final<|message|>`) is context, like the header: at inference the template or the
generation prompt writes it too. A turn that no special token follows (GLM's last turn) trains its content only.
"""

from __future__ import annotations

import logging
import re

from finetune.data.rows import RowError

log = logging.getLogger("finetune")

OPEN, CLOSE = "\ue000", "\ue001"
"""Private-use characters: no template or tokenizer gives them a meaning, so markers made of them
survive rendering unchanged and cannot be confused with real text (a row containing them is refused)."""
MARKER = re.compile(f"{OPEN}(\\d+){CLOSE}")
PROBE = "\ue002system probe\ue002"


def render(tokenizer, messages, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as exc:  # noqa: BLE001  # jinja raise_exception() and template errors
        raise RowError(f"the chat template rejects this conversation: {exc}") from None


def _render_or_none(tokenizer, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001  # a template refusing the marked conversation: the next way, or fail below
        return None


def _marked(messages, turns, wrap: bool) -> list[dict]:
    out = [dict(m) for m in messages]
    for k, i in enumerate(turns):
        marker = f"{OPEN}{k}{CLOSE}"
        out[i]["content"] = marker + out[i]["content"] + marker if wrap else marker
    return out


def _wrapped(tokenizer, messages, turns, full) -> list[tuple[int, int]] | None:
    """Spans from a rendering whose assistant contents are wrapped in markers, if that rendering
    without its markers is the real one (the template used each content as given)."""
    text = _render_or_none(tokenizer, _marked(messages, turns, wrap=True))
    if text is None:
        return None
    found = [int(m.group(1)) for m in MARKER.finditer(text)]
    if found != [k for k in range(len(turns)) for _ in (0, 1)]:
        return None  # a content dropped, repeated or split by the template
    clean, spans, last, removed = [], [], 0, 0
    for n, m in enumerate(MARKER.finditer(text)):
        clean.append(text[last:m.start()])
        at = m.start() - removed
        if n % 2 == 0:
            start = at
        else:
            spans.append((start, at))
        removed += m.end() - m.start()
        last = m.end()
    clean.append(text[last:])
    return spans if "".join(clean) == full else None


def _between(tokenizer, messages, turns, full) -> list[tuple[int, int]] | None:
    """Spans from matching the template text between content markers against the real rendering:
    for templates that trim or strip content. What stands in a content's place must be that
    content up to surrounding whitespace."""
    text = _render_or_none(tokenizer, _marked(messages, turns, wrap=False))
    if text is None:
        return None
    parts = MARKER.split(text)
    if [int(k) for k in parts[1::2]] != list(range(len(turns))):
        return None
    segments = parts[0::2]
    if not full.startswith(segments[0]):
        return None
    pos, spans = len(segments[0]), []
    for k, i in enumerate(turns):
        want, after = messages[i]["content"].strip(), segments[k + 1]
        if k == len(turns) - 1:
            ends = [len(full) - len(after)] if full.endswith(after) else []
        else:
            ends, at = [], full.find(after, pos)
            while at != -1:
                ends.append(at)
                at = full.find(after, at + 1)
        end = next((e for e in ends if e >= pos and full[pos:e].strip() == want), None)
        if end is None:
            return None
        spans.append((pos, end))  # all the template rendered in the content's place, its kept whitespace too
        pos = end + len(after)
    return spans


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens, longest first (so `<|end|>` never shadows a longer one)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def assistant_spans(tokenizer, messages: list[dict], from_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: each content and
    the special token right after it. from_turn skips the turns before it (a preference prompt's
    own assistant turns are context)."""
    full = render(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= from_turn]
    if not turns:
        return full, []
    if OPEN in full or CLOSE in full:
        raise RowError("the conversation contains the private-use characters U+E000/U+E001 that locate "
                       "assistant turns; remove them or set data.assistant_only_loss: false")
    spans = _wrapped(tokenizer, messages, turns, full) or _between(tokenizer, messages, turns, full)
    if spans is None:
        raise RowError(
            f"cannot locate the assistant turns ({', '.join(f'messages[{i}]' for i in turns)}) in the chat "
            "template's rendering: the template rewrites their content (e.g. moves a <think> block out of it) "
            "beyond surrounding whitespace; set data.assistant_only_loss: false, or give model.chat_template a "
            "template that renders assistant content as given")
    specials = special_tokens(tokenizer)
    out = []
    for start, end in spans:
        # spaces (not newlines) may stand before the end token: Llama-2's `content + ' ' + eos_token`
        at = end + len(full[end:]) - len(full[end:].lstrip(" \t"))
        token = next((t for t in specials if full.startswith(t, at)), None)
        out.append((start, at + len(token) if token else end))
    return full, out


def system_choice(tokenizer, choice: str) -> str:
    """data.system as applied: `auto` is keep when the template renders a system turn, else fold
    (a template that raises on system turns, or drops them silently, would lose every system prompt)."""
    if choice != "auto":
        return choice
    probe = [{"role": "system", "content": PROBE}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    text = _render_or_none(tokenizer, probe)
    if text is not None and PROBE in text:
        return "keep"
    log.info("data.system: auto: the chat template %s system turns, so they are folded into the first user turn",
             "refuses" if text is None else "leaves out")
    return "fold"
