"""SFT on the bundled tiny model with data.too_long: truncate: the counts by reason per source reach
<run>/data_report.json and the run's log; `finetune data` before it prepared the very rows the run
trains on (the run finds its cache entry)."""

from __future__ import annotations

import json
import logging

from conftest import TINY_MOE, recipe_file, sft_recipe, write_jsonl

from finetune.cli import main
from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft


def turn(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_truncation_counts_reach_the_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    rows = [{"messages": turn(f"Reverse the word {w}.", w[::-1])} for w in ("lamp", "star", "cloud", "stone")]
    rows += [{"messages": turn("Say cloud many times.", "cloud " * 40)},
             {"messages": turn("Count the words: " + "gold wind hat " * 20, "60")}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    recipe = sft_recipe(tmp_path, TINY_MOE, data, sft={"max_steps": 1, "per_device_train_batch_size": 5, "logging_steps": 1})
    recipe["data"] = {"train": [str(data)], "max_length": 40, "too_long": "truncate"}
    path = recipe_file(tmp_path, **recipe)
    assert main(["data", str(path), "--show", "0", "--output", str(tmp_path / "report")]) == 0
    assert "cache entry prepared" in caplog.text
    caplog.clear()
    out = run_sft(read_recipe(path))
    assert "data: 0 rows tokenized here, cache hit" in caplog.text
    (source,) = json.loads((out / "data_report.json").read_text())["sources"]
    assert (source["rows_read"], source["usable"], source["used"]) == (6, 5, 5)
    assert source["dropped"] == {"no trained token left": 1} and source["changed"] == {"truncated": 1}
    assert json.loads((out / "metrics.json").read_text())["rows"] == 5
    assert f"data.train[0] {data} (messages): 5 of 5 usable rows used; dropped: 1 no trained token left; " \
           "changed: 1 truncated" in caplog.text
