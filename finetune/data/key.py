"""The data cache key: everything that changes the prepared rows, and nothing else.

    finetune sft recipes/tiny-moe/sft.yaml      # the key names the cache entry (finetune/data/cache.py)

In: every data.* setting, each source's content and how it is read (format, mapping, mixture), the
seed when it draws (eval split, mixture), the tokenizer as it tokenizes and the chat template as it
renders today, this package's code, the versions of what tokenizes. Not num_proc: the same result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata
from pathlib import Path

import finetune
from finetune.data import cache, mixture, sources
from finetune.recipe import DataSection


def key_parts(section: DataSection, tokenizer, kind: str, seed: int) -> dict:
    """Everything that changes the prepared rows. Every data.* setting is in (new ones too, e.g.
    formats and mappings); the seed only when it draws the eval split; not num_proc (same result)."""
    settings = {k: v for k, v in dataclasses.asdict(section).items() if k not in ("train", "eval")}
    return {
        "kind": kind,
        "data": settings,
        # with each source's format, mapping, mixture; local files' hashes remembered under their stat
        "train": [sources.fingerprint(s, memo=cache.root() / cache.HASHES) for s in section.train],
        "eval": [sources.fingerprint(s, memo=cache.root() / cache.HASHES) for s in section.eval],
        "seed": seed if (not section.eval and section.eval_split > 0) or _mixed(section) else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": code_hash(),
        "versions": {p: metadata.version(p) for p in ("datasets", "pyarrow", "tokenizers", "transformers", "jinja2", "trl")}
        | {"finetune": finetune.__version__},
    }


CODE = Path(__file__).parent
"""The data package: a change to any of its modules (reading, row checks, masks, converters,
this preparation) may change the prepared rows, so all of them are in the key."""


def _mixed(section: DataSection) -> bool:
    """A mixture draws rows with the seed."""
    return mixture.mixed([sources.spec(s) for s in [*section.train, *section.eval]])


def code_hash() -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CODE.glob("*.py")))).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """The tokenizer as it tokenizes: its serialized model (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens) without the per-call truncation/padding state, its special tokens
    and the chat template in use (a recipe's model.chat_template included)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        model = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    else:  # a slow (Python) tokenizer: datasets' own hash of the object
        from datasets.fingerprint import Hasher  # a slow tokenizer only (rare)

        model = Hasher.hash(tokenizer)
    return {"class": type(tokenizer).__name__, "model": model, "special": [tokenizer.bos_token, tokenizer.eos_token,
            *tokenizer.all_special_tokens], "chat_template": tokenizer.chat_template, "rendered": _probe(tokenizer)}


def _probe(tokenizer) -> str | None:
    """A fixed conversation as the template renders it today: a template that writes the date
    (gpt-oss's harmony template: "Current date: ...") renders rows differently tomorrow, so its
    prepared rows must not be reused then."""
    if not tokenizer.chat_template:
        return None
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                             tokenize=False)
    except Exception as exc:  # a template that refuses even this: its message identifies it as well
        return f"error: {exc}"
