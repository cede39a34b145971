"""`finetune validate` on data sources: every local source's first rows are read before any model
loads; bad formats, mappings and mixtures are validate errors naming the key, and `finetune sft`
stops on them with nothing loaded or written."""

from __future__ import annotations

import csv
import logging

import pytest
from conftest import TINY_MOE, recipe_file, write_jsonl

from finetune.cli import main
from finetune.errors import UserError
from finetune.recipe import read_recipe
from finetune.validate import check

SHAREGPT = {"conversations": [{"from": "human", "value": "Reverse the word lamp."}, {"from": "gpt", "value": "pmal"}]}


@pytest.fixture
def files(tmp_path):
    sharegpt = write_jsonl(tmp_path / "chats.jsonl", [SHAREGPT] * 3)
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        csv.writer(f).writerows([["question", "answer"], ["Say a.", "a"], ["Say b.", "b"]])
    return sharegpt, tmp_path / "qa.csv"


def recipe(tmp_path, train, **data):
    return recipe_file(tmp_path, output_dir=str(tmp_path / "run"), model={"name_or_path": str(TINY_MOE), "dtype": "float32"},
                       data={"train": train, "max_length": 64, **data}, sft={"max_steps": 1})


def problems_of(path) -> list[str]:
    with pytest.raises(UserError) as info:
        check(read_recipe(path), "sft")
    return [str(p) for p in info.value.problems]


def test_sharegpt_file_without_format_or_columns_validates(tmp_path, files, caplog):
    sharegpt, qa = files
    train = [str(sharegpt), {"path": str(qa), "format": "prompt_completion", "columns": {"prompt": "question",
                                                                                     "completion": "answer"}}]
    with caplog.at_level(logging.INFO, logger="finetune"):
        checked = check(read_recipe(recipe(tmp_path, train)), "sft")
    assert checked.stage == "sft"
    assert f"data.train[0] {sharegpt}: format sharegpt (detected from its columns: conversations)" in caplog.text
    assert f"data.train[1] {qa}: format prompt_completion (as set), columns" in caplog.text


def test_bad_sources_are_validate_errors_naming_the_key(tmp_path, files):
    sharegpt, qa = files
    train = [
        {"path": str(sharegpt), "format": "sharegtp"},
        {"path": str(qa), "columns": {"prompt": "questoin", "completion": "answer"}},
        str(qa),
        {"path": str(sharegpt), "weight": -1},
        {"path": str(sharegpt), "weight": float("nan")},
        {"path": str(sharegpt), "samples": 9},
        {"path": str(sharegpt), "weight": 1, "samples": 2},
        {"path": str(sharegpt), "samples": 1, "split": "test"},
    ]
    evals = [{"path": str(sharegpt), "weight": 0}, {"path": str(sharegpt), "weight": 0}]
    found = problems_of(recipe(tmp_path, train, eval=evals))
    text = "\n".join(found)
    assert "data.train[0].format: `sharegtp` is not one of auto, messages, prompt_completion, sharegpt, alpaca, " \
           "preference (did you mean `sharegpt`?)" in found
    assert f"data.train[1].columns.prompt: no column `questoin` in {qa} (columns found: question, answer) " \
           "(did you mean `question`?)" in found
    assert f"data.train[2]: {qa}: its columns (question, answer) match no SFT format" in text
    assert f"e.g. {{path: {qa}, format: prompt_completion, columns: {{prompt: question, completion: answer}}}}" in text
    assert "data.train[3].weight: must be >= 0, got -1.0" in found
    assert "data.train[4].weight: must be a finite number, got nan" in found
    assert f"data.train[5].samples: 9 rows asked of {sharegpt}, which has 3; lower samples, or set replace: true to " \
           "draw with replacement" in found
    assert "data.train[6]: weight and samples are both set; give one (weight: a share of the mixture, samples: a " \
           "number of rows)" in found
    assert f"data.train[7].split: applies to hub data sets and folders; {sharegpt} is a file: remove it" in found
    assert "data.eval: the weights sum to 0; give at least one source a positive weight" in found
    # the weighted list asks every source for its share
    assert any(p.startswith("data.train[2]: data.train[3] has a weight, so every source") for p in found)


def test_dpo_formats_and_unknown_mapping_keys(tmp_path, files):
    sharegpt, _ = files
    path = recipe(tmp_path, [{"path": str(sharegpt), "format": "messages"},
                             {"name": "someone/prefs", "columns": {"promt": "q"}}])
    with pytest.raises(UserError) as info:
        check(read_recipe(path), "dpo")
    found = [str(p) for p in info.value.problems]
    assert "data.train[0].format: `messages` is not a DPO format; DPO formats: auto, sharegpt, alpaca, preference" in found
    assert any(p.startswith("data.train[1].columns.promt: `promt` is not a column of any format") and
               "(did you mean `prompt`?)" in p for p in found)


def test_sft_stops_on_a_bad_source_with_nothing_loaded_or_written(tmp_path, files, capsys, monkeypatch):
    _, qa = files
    import finetune.stages.sft as sft_stage
    from finetune.data import cache

    monkeypatch.setattr(sft_stage, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sft_stage.modeling, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded"))
    entries = sorted(cache.root().glob("*")) if cache.root().is_dir() else []
    path = recipe(tmp_path, [str(qa)])
    assert main(["sft", str(path)]) == 2
    assert "data.train[0]: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl", "qa.csv", "recipe.yaml"]
    assert (sorted(cache.root().glob("*")) if cache.root().is_dir() else []) == entries
