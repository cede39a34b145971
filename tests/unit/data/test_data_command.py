"""`finetune data` on the bundled tiny model: counts by reason per source, the length histogram PNG,
rendered rows whose brackets hold exactly the assistant-mask tokens; validate refuses a bad too_long."""

from __future__ import annotations

import re
import struct

import pytest
from conftest import TINY_MOE, recipe_file, write_jsonl
from transformers import AutoTokenizer

from finetune.cli import main
from finetune.data.prep import build_datasets
from finetune.data.preview import CLOSE, GREEN, OPEN, RESET, render_marked
from finetune.errors import UserError
from finetune.recipe import read_recipe
from finetune.validate import check

GROUP = re.compile(f"{OPEN}(.*?){CLOSE}", re.DOTALL)


def turn(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


ROWS = [
    {"messages": turn("Reverse the word lamp.", "pmal") + turn("And star?", "rats")},      # two trained runs
    {"messages": turn("Say cloud many times.", "cloud " * 40)},                             # truncated
    {"messages": turn("Count the words: " + "gold wind hat " * 20, "60")},                  # no trained token left
    {"text": "not a chat row"},                                                             # malformed
    {"messages": turn("Reverse the word stone.", "enots")},
]


def runs_of(ids, mask):
    """The id runs the mask marks as trained, in order."""
    out, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            out, current = out + [current], []
    return out + ([current] if current else [])


def test_data_command_counts_lengths_and_marked_rows(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    recipe = recipe_file(tmp_path, output_dir=str(tmp_path / "run"), model={"name_or_path": str(TINY_MOE)},
                         data={"train": [str(data)], "max_length": 40, "too_long": "truncate", "bad_rows": "drop"})
    assert main(["data", str(recipe), "--show", "3", "--output", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert f"data.train[0] {data} (messages): 5 rows read, 3 kept, 3 used" in out
    assert "dropped: 1 no trained token left, 1 malformed" in out  # in row order
    assert "changed: 1 truncated" in out
    assert re.search(r"token lengths \(3 train rows, as trained\): min \d+, .* max 40; 1 at data.max_length 40", out)
    png = tmp_path / "report" / "lengths-sft.png"
    assert f"histogram: {png}" in out
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (700, 350)
    # every shown row: brackets hold exactly its assistant-mask tokens (what trains)
    tok = AutoTokenizer.from_pretrained(TINY_MOE)
    train, _, _ = build_datasets(read_recipe(str(recipe)).data, tok, "sft", 42)  # a cache hit: the rows shown
    shown = out.split("--- train row ")[1:]
    assert len(shown) == 3
    for block, row in zip(shown, train):
        text = block.split("\n", 1)[1].rstrip("\n")
        marked = GROUP.findall(text)
        runs = runs_of(row["input_ids"], row["assistant_masks"])
        assert len(marked) == len(runs) >= 1
        assert [m.strip() for m in marked] == [tok.decode(r).strip() for r in runs]
        assert text.replace(OPEN, "").replace(CLOSE, "") == tok.decode(row["input_ids"])
    assert len(GROUP.findall(shown[0])) == 2  # both answers of the two-turn row, not its prompts


def test_colour_marks_the_same_tokens(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY_MOE)
    ids = tok.apply_chat_template(turn("Reverse the word lamp.", "pmal"), tokenize=True, return_dict=True)["input_ids"]
    mask = [0] * (len(ids) - 3) + [1] * 3
    plain, coloured = render_marked(tok, ids, mask, False), render_marked(tok, ids, mask, True)
    assert coloured == plain.replace(OPEN, GREEN).replace(CLOSE, RESET) and coloured.count(GREEN) == 1


def test_data_command_dpo_marks_the_chosen_completion(tmp_path, capsys):
    pairs = [{"prompt": [{"role": "user", "content": "Say glass twice."}],
              "chosen": [{"role": "assistant", "content": "glass glass"}],
              "rejected": [{"role": "assistant", "content": "wolf wolf"}]}]
    data = write_jsonl(tmp_path / "pref.jsonl", pairs * 2)
    recipe = recipe_file(tmp_path, output_dir=str(tmp_path / "run"), from_model=str(TINY_MOE),
                         data={"train": [str(data)], "max_length": 64})
    assert main(["data", str(recipe), "--stage", "dpo", "--show", "1", "--output", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "2 rows read, 2 kept, 2 used" in out and (tmp_path / "report" / "lengths-dpo.png").is_file()
    (block,) = out.split("--- train row ")[1:]
    assert [m.strip() for m in GROUP.findall(block)] == ["glass glass</s>"]


def test_validate_refuses_an_unknown_too_long(tmp_path):
    recipe = recipe_file(tmp_path, output_dir=str(tmp_path / "run"), model={"name_or_path": str(TINY_MOE)},
                         data={"train": [str(write_jsonl(tmp_path / "sft.jsonl", ROWS[:1]))], "too_long": "cut"})
    with pytest.raises(UserError, match=r"data.too_long: `cut` is not one of error, drop, truncate"):
        check(read_recipe(str(recipe)), "sft")
    # TRL's own truncation_mode would undo what too_long: truncate counted: one place for the setting
    recipe = recipe_file(tmp_path, output_dir=str(tmp_path / "run"), from_model=str(TINY_MOE),
                         data={"train": [str(write_jsonl(tmp_path / "p.jsonl", []))]}, dpo={"truncation_mode": "keep_end"})
    with pytest.raises(UserError, match=r"dpo.truncation_mode: set `data.too_long` in the recipe instead"):
        check(read_recipe(str(recipe)), "dpo")
