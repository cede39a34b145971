"""`finetune validate`: shipped recipes pass; each kind of bad recipe is caught with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assume_tensorboard, recipe_file, sft_recipe

from finetune.cli import main
from finetune.errors import UserError
from finetune.recipe import read_recipe
from finetune.validate import check

SHIPPED_SFT = sorted((REPO / "recipes").glob("*/sft*.yaml"))  # sft.yaml, sft-qlora.yaml, ...
SHIPPED_DPO = sorted((REPO / "recipes").glob("*/dpo*.yaml"))  # each checked against its sft*.yaml twin


def problems_of(path: Path, stage=None) -> list[str]:
    with pytest.raises(UserError) as info:
        check(read_recipe(path), stage)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", SHIPPED_SFT, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_sft_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(REPO)
    assume_tensorboard(monkeypatch)
    checked = check(read_recipe(path.relative_to(REPO)))
    assert checked.stage == "sft" and checked.moe
    assert set(checked.targets.groups) == {"attention", "experts"}


@pytest.mark.parametrize("path", SHIPPED_DPO, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_dpo_recipes_validate(path, tmp_path, monkeypatch):
    """A DPO recipe is checked against the SFT run it names; stand one up from the shipped SFT recipe."""
    monkeypatch.chdir(REPO)
    assume_tensorboard(monkeypatch)
    twin = path.parent / path.name.replace("dpo", "sft")
    sft = read_recipe(twin)
    run = tmp_path / "sft-run"
    run.mkdir()
    (run / "recipe.yaml").write_text(twin.read_text())
    (run / "chain.json").write_text(json.dumps([{"kind": "base", "model": sft.model.name_or_path}, {"kind": "sft", "run": str(run)}]))
    checked = check(read_recipe(path.relative_to(REPO), [f"from_run={run}"]))
    assert checked.stage == "dpo" and checked.recipe.model.name_or_path == sft.model.name_or_path
    assert checked.recipe.model.quantization == sft.model.quantization
    assert set(checked.targets.groups) == {"attention", "experts"}


def test_every_problem_reported_at_once_with_dotted_paths(tmp_path, tiny_mixtral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file)
    recipe["modle"] = {}  # typo of a section
    recipe["lora"]["experts"] = {"r": "eight", "targets": ["w1", "w9"]}
    recipe["data"]["train"] = [str(tmp_path / "missing.jsonl")]
    recipe["router"] = {"policy": "trian"}
    recipe["sft"]["learning_rat"] = 1e-4
    recipe["sft"]["max_length"] = 12
    problems = problems_of(recipe_file(tmp_path, **recipe))
    text = "\n".join(problems)
    assert "modle: unknown key (did you mean `model`?)" in text
    assert "lora.experts.r: expected int" in text
    assert "router.policy: `trian` is not one of freeze, train, lora (did you mean `train`?)" in text
    assert "sft.learning_rat: not a trl.SFTConfig field (did you mean `learning_rate`?)" in text
    assert "sft.max_length: set `data.max_length` in the recipe instead" in text
    assert "data.train[0]: file not found" in text


def test_expert_target_that_matches_nothing_fails(tmp_path, tiny_mixtral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, lora={"experts": {"targets": ["w1", "up_proj"]}})
    problems = problems_of(recipe_file(tmp_path, **recipe))
    assert any("lora.experts.targets: `up_proj` matches nothing" in p and "attention only" in p for p in problems)


def test_expert_aliases_resolve_to_fused_parameters(tmp_path, tiny_mixtral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, lora={"experts": {"targets": ["w1", "w3", "w2"]}})
    checked = check(read_recipe(recipe_file(tmp_path, **recipe)))
    assert checked.targets.groups["experts"].targets == ["gate_up_proj", "down_proj"]


def test_dropout_with_expert_lora_is_refused_as_peft_would_at_wrap_time(tmp_path, tiny_mixtral, sft_file):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.lora.targets import lora_config

    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, lora={"dropout": 0.05})
    problems = problems_of(recipe_file(tmp_path, **recipe))
    assert any(p.startswith("lora.dropout: 0.05 is not supported with expert or router LoRA") for p in problems)
    # the check mirrors PEFT: wrapping the fused experts with dropout fails there
    attention_only = sft_recipe(tmp_path, tiny_mixtral, sft_file, lora={"dropout": 0.05, "experts": False})
    checked = check(read_recipe(recipe_file(tmp_path, **attention_only)))
    plan = checked.targets
    plan.groups["experts"] = type(plan.groups["attention"])(r=4, alpha=8.0, targets=["gate_up_proj"])
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_mixtral), lora_config(plan))


def test_router_options_rejected_on_dense_model(tmp_path, tiny_mistral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mistral, sft_file, lora={"experts": False}, router={"policy": "train"})
    problems = problems_of(recipe_file(tmp_path, **recipe))
    assert any(p.startswith("router.policy: the model has no MoE router") for p in problems)


def test_expert_lora_rejected_on_dense_model(tmp_path, tiny_mistral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mistral, sft_file)  # asks for experts explicitly
    problems = problems_of(recipe_file(tmp_path, **recipe))
    assert any(p.startswith("lora.experts: the model is dense") for p in problems)


def test_dense_defaults_to_attention_and_mlp(tmp_path, tiny_mistral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mistral, sft_file)
    del recipe["lora"]
    checked = check(read_recipe(recipe_file(tmp_path, **recipe)))
    assert set(checked.targets.groups) == {"attention", "mlp"}


def test_incompatible_stage_sections(tmp_path, tiny_mixtral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, from_run=str(tmp_path), dpo={"beta": 0.1})
    problems = problems_of(recipe_file(tmp_path, **recipe), "sft")
    assert any(p.startswith("dpo: an SFT recipe") for p in problems)
    assert any(p.startswith("from_run: only DPO recipes") for p in problems)


def test_set_override_and_bad_value(tmp_path, tiny_mixtral, sft_file):
    path = recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file))
    recipe = read_recipe(path, ["sft.learning_rate=3e-4", "lora.attention.r=2"])
    assert recipe.sft["learning_rate"] == 3e-4 and recipe.lora.attention.r == 2
    with pytest.raises(UserError) as info:
        check(read_recipe(path, ["data.max_length=long"]))
    assert "data.max_length: expected int, got 'long'" in str(info.value)


def test_cli_exit_status_2_and_no_traceback(tmp_path, tiny_mixtral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, lora={"atention": {"r": 4}})
    path = recipe_file(tmp_path, **recipe)
    assert main(["validate", str(path)]) == 2
    proc = subprocess.run([sys.executable, "-m", "finetune", "validate", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "lora.atention: unknown key (did you mean `attention`?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_not_yaml_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="a recipe is a mapping"):
        read_recipe(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_recipe(path)
    assert yaml  # imported for recipe_file
