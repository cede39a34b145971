"""docs/data.md's examples are what the code reads: every JSON row converts in its format (detected,
as format: auto would) for the stage its section names, and every YAML block parses as a recipe."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import REPO, TINY_MOE

from finetune.data import formats
from finetune.data.convert import preference_row
from finetune.data.rows import sft_messages
from finetune.modeling import load_tokenizer
from finetune.recipe import ModelSection, recipe_from_dict

PAGE = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(json|yaml)\n(.*?)^```", re.DOTALL | re.MULTILINE)
PREFERENCE = PAGE.index("### Preference rows")


def examples(info: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(2)) for m in FENCE.finditer(PAGE) if m.group(1) == info]


def test_every_format_has_an_example():
    detected = {(formats.detect(json.loads(text), "sft" if at < PREFERENCE else "preference"),
                 "sft" if at < PREFERENCE else "preference") for at, text in examples("json")}
    assert detected == {(name, kind) for name, f in formats.FORMATS.items() for kind in f.needs}


@pytest.mark.parametrize("at, text", examples("json"), ids=lambda v: str(v)[:40])
def test_json_rows_convert(at, text):
    row = json.loads(text)
    if at < PREFERENCE:
        shaped = sft_messages(formats.to_shape(row, "auto", {}, "sft"))
        assert shaped
    else:
        tokenizer = load_tokenizer(ModelSection(name_or_path=str(TINY_MOE)))
        out = preference_row(formats.to_shape(row, "auto", {}, "preference"), tokenizer, 1024)
        assert out["chosen"] != out["rejected"]


@pytest.mark.parametrize("text", [t for _, t in examples("yaml")], ids=lambda v: v[:30])
def test_yaml_blocks_parse_as_recipes(text):
    problems = []
    recipe_from_dict(yaml.safe_load(text), problems)
    assert problems == []
