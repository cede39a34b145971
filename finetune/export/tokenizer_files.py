"""The exported tokenizer files: loadable by transformers 4.x and 5.x, and read right by llama.cpp.

    finetune export RUN --output DIR   (finetune/export/__init__.py calls save_tokenizer)

transformers 5 saves `"tokenizer_class": "TokenizersBackend"`, a class only 5.x knows; tools pinned
to 4.x (llama.cpp's converter among them) fail on it. `PreTrainedTokenizerFast` is the class both
versions build straight from tokenizer.json, with no conversion, so the ids cannot drift.
llama.cpp's converter (conversion/llama.py) reads `add_prefix_space` from tokenizer_config.json
into `tokenizer.ggml.add_space_prefix`; left unset, llama.cpp's SPM reader inserts a space before
the text after every special token (so "[INST] reverse" gets one token more than in transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

PORTABLE_CLASS = "PreTrainedTokenizerFast"


def _components(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return [c for n in inner for c in _components(n)]
    return [node]


def adds_own_space_prefix(tokenizer_json: dict) -> bool:
    """True when the tokenizer turns a leading space into the word-start mark itself (a Metaspace
    pre-tokenizer, no Prepend normalizer): text after a special token already starts with a space in
    chat prompts, so a reader that adds one more (llama.cpp's SPM) tokenizes it differently."""
    metaspace = any(c.get("type") == "Metaspace" and c.get("prepend_scheme", "always") != "never"
                    for c in _components(tokenizer_json.get("pre_tokenizer")))
    prepend = any(c.get("type") == "Prepend" for c in _components(tokenizer_json.get("normalizer")))
    return metaspace and not prepend


def save_tokenizer(tokenizer, directory: Path) -> dict:
    """tokenizer.save_pretrained, then the portable class and the converter's space-prefix hint."""
    tokenizer.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = PORTABLE_CLASS
    # 4.x's PreTrainedTokenizerFast would also return token_type_ids, which generate(**inputs) refuses.
    config["model_input_names"] = list(tokenizer.model_input_names)
    for key in ("is_local", "local_files_only"):  # how transformers 5 loaded it here, not a property of the tokenizer
        config.pop(key, None)
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file() and not (directory / "tokenizer.model").is_file():
        # With a sentencepiece tokenizer.model the converter reads the prefix rule from that file instead.
        if adds_own_space_prefix(json.loads(tokenizer_json.read_text())):
            config["add_prefix_space"] = False
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {"tokenizer_class": config["tokenizer_class"], "add_prefix_space": config.get("add_prefix_space")}
