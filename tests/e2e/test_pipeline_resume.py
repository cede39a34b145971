"""`finetune pipeline --resume`: finished stages of the same recipe are kept, an interrupted stage
continues from its checkpoint, a finished run of another recipe is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import make_rows, sft_recipe, write_jsonl
from test_resume import InterruptAt

from finetune.errors import UserError
from finetune.pipeline import run_pipeline
from finetune.recipe import read_recipe
from finetune.stages.dpo import run_dpo

STEPS = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1}


@pytest.fixture
def recipes(tmp_path, tiny_mixtral, sft_file, pref_file):
    directory = tmp_path / "recipes"
    directory.mkdir()
    sft = sft_recipe(tmp_path, tiny_mixtral, sft_file, output_dir=str(tmp_path / "runs" / "sft"), sft=STEPS)
    dpo = {"output_dir": str(tmp_path / "runs" / "dpo"), "data": {"train": [str(pref_file)], "max_length": 64},
           "lora": sft["lora"], "dpo": {**STEPS, "learning_rate": 1e-3, "save_steps": 1}}
    (directory / "sft.yaml").write_text(yaml.safe_dump(sft))
    (directory / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    return directory


def stamps(tmp_path) -> dict:
    files = [tmp_path / "runs" / "sft" / "adapter_model.safetensors", tmp_path / "runs" / "dpo" / "adapter_model.safetensors",
             tmp_path / "export" / "export.json"]
    return {f.parent.name: f.stat().st_mtime_ns for f in files if f.exists()}


def test_resume_keeps_finished_stages_and_refuses_another_recipe(tmp_path, recipes, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = [str(write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["messages"][:1], "answer": r["messages"][1]["content"]}
                                                       for r in make_rows(4, seed=5)]))]
    args = dict(eval_data=data, export_dir=str(tmp_path / "export"), with_passkey=False)
    first = run_pipeline(str(recipes), **args)
    before = stamps(tmp_path)
    assert set(before) == {"sft", "dpo", "export"}

    again = run_pipeline(str(recipes), **args, resume=True)  # nothing left to do: every stage kept
    assert stamps(tmp_path) == before
    assert again["results"] == first["results"]

    # DPO interrupted in its second step (its run gone, checkpoint-1 left): DPO continues from
    # the checkpoint, SFT is kept, the export is redone
    shutil.rmtree(tmp_path / "runs" / "dpo")
    dpo = read_recipe(recipes / "dpo.yaml", [f"from_run={tmp_path / 'runs' / 'sft'}"])
    with pytest.raises(KeyboardInterrupt):
        run_dpo(dpo, callbacks=[InterruptAt(2)])
    run_pipeline(str(recipes), **args, resume=True)
    after = stamps(tmp_path)
    assert after["sft"] == before["sft"] and after["dpo"] != before["dpo"] and after["export"] != before["export"]
    assert json.loads((tmp_path / "runs" / "dpo" / "metrics.json").read_text())["resumed_from"] == "checkpoint-1"

    raw = yaml.safe_load((recipes / "dpo.yaml").read_text())
    raw["dpo"]["beta"] = 0.5
    (recipes / "dpo.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"finished dpo run of another recipe \(dpo\.beta\)"):
        run_pipeline(str(recipes), **args, resume=True)
    assert stamps(tmp_path) == after
