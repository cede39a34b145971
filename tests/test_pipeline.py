"""The main job on the bundled default: SFT -> DPO -> export -> eval, and the gains it is built to show.

Slow (a few minutes on 2 CPU cores): run with `pytest -m slow`.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, TINY_TASKS

from finetune.pipeline import run_pipeline


@pytest.mark.slow
def test_pipeline_on_bundled_default_improves_each_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped recipes name repository-relative paths
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for stage in ("sft", "dpo"):
        raw = yaml.safe_load((REPO / "recipes" / "tiny-moe" / f"{stage}.yaml").read_text())
        raw["output_dir"] = str(tmp_path / "runs" / stage)
        (recipes / f"{stage}.yaml").write_text(yaml.safe_dump(raw))
    test_file = str(TINY_TASKS / "test.jsonl")
    summary = run_pipeline(str(recipes), [test_file], export_dir=str(tmp_path / "export"))

    em = {stage: summary["results"][stage][test_file]["exact_match"] for stage in ("base", "sft", "dpo", "export")}
    assert em["base"] < em["sft"] < em["dpo"], em
    assert em["sft"] - em["base"] >= 0.3 and em["dpo"] - em["sft"] >= 0.05, em
    # DPO's gain comes where the SFT data was wrong on purpose (data/tiny-tasks/README.md)
    per_task = {stage: summary["results"][stage][test_file]["per_task"] for stage in ("sft", "dpo")}
    for flawed in ("last_letter", "sort"):
        assert per_task["dpo"][flawed] - per_task["sft"][flawed] >= 0.3, per_task
    assert em["export"] == pytest.approx(em["dpo"], abs=0.02), em  # float32 export: same answers
    assert summary["seconds"]["total"] < 600
