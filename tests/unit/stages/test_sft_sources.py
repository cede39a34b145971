"""SFT on the bundled tiny model from a mixture of a ShareGPT file and a mapped CSV: the run records
what each source gave (<run>/data_report.json `sources`) and its recipe keeps the source mappings."""

from __future__ import annotations

import csv
import json

from conftest import TINY_MOE, TINY_TASKS, recipe_file, sft_recipe, write_jsonl

from finetune.recipe import DataSource, read_recipe
from finetune.runs import read_run
from finetune.stages.sft import run_sft

SPEAKER = {"user": "human", "assistant": "gpt"}


def test_mixture_run_writes_its_data_report(tmp_path):
    rows = [json.loads(line) for line in (TINY_TASKS / "sft.jsonl").read_text().splitlines()[:30]]
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]} for m in r["messages"]]} for r in rows[:20]])
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        csv.writer(f).writerows([["question", "answer"]] + [[r["messages"][0]["content"], r["messages"][1]["content"]]
                                                            for r in rows[20:]])
    train = [{"path": str(chats), "weight": 1},
             {"path": str(tmp_path / "qa.csv"), "weight": 1, "columns": {"prompt": "question", "completion": "answer"}}]
    recipe = sft_recipe(tmp_path, TINY_MOE, chats, sft={"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1})
    recipe["data"] = {"train": train, "max_length": 96}
    out = run_sft(read_recipe(recipe_file(tmp_path, **recipe)))
    report = json.loads((out / "data_report.json").read_text())
    # equal shares: the 10 CSV rows run out first, so 10 of the 20 ShareGPT rows
    assert [(s["where"], s["format"], s["usable"], s["used"]) for s in report["sources"]] == [
        ("data.train[0]", "sharegpt", 20, 10), ("data.train[1]", "prompt_completion", 10, 10)]
    assert json.loads((out / "metrics.json").read_text())["rows"] == 20
    recorded = read_run(out).recipe.data.train
    assert recorded[1] == DataSource(path=str(tmp_path / "qa.csv"), weight=1.0,
                                     columns={"prompt": "question", "completion": "answer"})
