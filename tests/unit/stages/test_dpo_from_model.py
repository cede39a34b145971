"""DPO from any model (`from_model:`): an export of this tool, a plain checkpoint, a hub id; the reference is that model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_MOE, recipe_file, sft_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM

from finetune import runs
from finetune.errors import UserError
from finetune.export import export
from finetune.pipeline import run_pipeline
from finetune.recipe import read_recipe
from finetune.runs import from_model
from finetune.stages.dpo import build_trainer, run_dpo
from finetune.stages.sft import run_sft
from finetune.validate import check
from finetune.validate.resolve import absolute

HUB_ID = "mistralai/Mixtral-8x7B-v0.1"  # its config is bundled (model/configs): validate needs no network


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_mixtral, sft_file):
    """An export of this tool: SFT a few steps on the tiny Mixtral, then `finetune export`."""
    tmp = tmp_path_factory.mktemp("from-export")
    # a large learning rate so the export is far from the raw base: a wrong reference shows
    sft = run_sft(read_recipe(recipe_file(tmp, **sft_recipe(tmp, tiny_mixtral, sft_file,
                                                            sft={"learning_rate": 5e-2, "max_steps": 3}))))
    return sft, export(str(sft), str(tmp / "export"), dtype="float32", progress=False)


def dpo_recipe(tmp_path, pref_file, name="dpo.yaml", **keys):
    sections = {
        "output_dir": str(tmp_path / "dpo-run"),
        "data": {"train": [str(pref_file)], "max_length": 64},
        "lora": {"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2},
    }
    sections.update(keys)
    return recipe_file(tmp_path, name, **sections)


def problems_of(path, stage=None) -> list[str]:
    with pytest.raises(UserError) as info:
        check(read_recipe(path), stage)
    return [str(p) for p in info.value.problems]


def first_rewards(run) -> tuple[dict, dict]:
    logged = [e for e in json.loads((run / "metrics.json").read_text())["log_history"] if "rewards/chosen" in e]
    return logged[0], logged[-1]


def test_dpo_from_an_export_records_it_and_exports(tmp_path, exported, pref_file, tiny_mixtral):
    sft, model = exported
    run = run_dpo(read_recipe(dpo_recipe(tmp_path, pref_file, from_model=str(model), dpo={
        "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2})))

    # policy == reference (the export) at step 1: every implicit reward 0; then training moves them
    # (by step 3: the first optimizer step is the warm-up's, at learning rate 0)
    first, last = first_rewards(run)
    assert first["step"] == 1
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert abs(last["rewards/chosen"]) > 1e-4

    chain = json.loads((run / "chain.json").read_text())
    assert [c["kind"] for c in chain] == ["base", "dpo"]
    assert chain[0]["model"] == str(model) and chain[0]["from_model"] is True
    record = chain[0]["export_of"]  # the export's own record: the run it came from, its base
    assert record["run"] == str(sft) and record["base"] == str(tiny_mixtral)
    assert [c["kind"] for c in record["chain"]] == ["base", "sft"] and record["dtype"] == "float32"
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["from_model"] == str(model) and resolved["model"]["name_or_path"] == str(model)
    assert "from_run" not in resolved or resolved["from_run"] is None
    assert json.loads((run / "metrics.json").read_text())["reference"].startswith(f"from_model {model}")
    card = (run / "README.md").read_text()
    assert f"applies to the base model `{model}` directly" in card
    assert "(`from_model`), which is also its reference model" in card and f"the run `{sft}`" in card
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model)

    # the export merges the DPO adapter into from_model, and its checks still pass
    out = export(str(run), str(tmp_path / "export2"), dtype="float32", progress=False)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["from_model"]["model"] == str(model) and manifest["from_model"]["export_of"]["run"] == str(sft)
    assert manifest["chain"][0]["model"] == str(model) and manifest["base_checkpoint"] == str(model)
    assert manifest["checks"]["tensors"]["max_relative_error"] <= 1e-5 and manifest["checks"]["forward"]["mode"] == "full"
    assert "an export of this tool, made from the run" in (out / "README.md").read_text()
    ids = torch.tensor([[1, 7, 11, 19, 23, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        start = AutoModelForCausalLM.from_pretrained(model).eval()
        start_logits = start(input_ids=ids).logits
        chained = PeftModel.from_pretrained(start, str(run)).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, chained, atol=1e-4, rtol=1e-4)
    assert (merged - start_logits).abs().max() > 1e-4  # the DPO adapter changed the model


def _sequence_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


def test_reference_is_from_model_not_its_base(tmp_path, exported, pref_file, tiny_mixtral):
    """TRL's reference log-probs are the export's, computed independently, and not the raw base's."""
    _, model = exported
    checked = check(read_recipe(dpo_recipe(tmp_path, pref_file, from_model=str(model))), "dpo")
    trainer, *_ = build_trainer(absolute(checked.recipe), checked, 0.02, None)
    batch = next(iter(trainer.get_train_dataloader()))
    got = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    with torch.no_grad():
        want = _sequence_logps(AutoModelForCausalLM.from_pretrained(model).eval(), batch)
        base = _sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval(), batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_dpo_from_a_plain_checkpoint(tmp_path, pref_file):
    """The bundled model/tiny-moe as it is: a transformers checkpoint with no record of this tool."""
    run = run_dpo(read_recipe(dpo_recipe(tmp_path, pref_file, from_model=str(TINY_MOE), model={"dtype": "float32"},
                                         dpo={"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1})))
    first, _ = first_rewards(run)
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    chain = json.loads((run / "chain.json").read_text())
    assert chain[0] == {"kind": "base", "model": str(TINY_MOE), "from_model": True}
    assert runs.read_run(run).recipe.model.name_or_path == str(TINY_MOE)
    card = (run / "README.md").read_text()
    assert f"DPO started from the model `{TINY_MOE}`" in card and "an export of this tool" not in card


def test_dpo_from_a_model_in_4bit(tmp_path, exported, pref_file):
    """model.quantization: nf4 loads from_model in 4-bit; the reference is that 4-bit model (adapter
    disabled), not a stacked "ref" adapter as for a 4-bit SFT run."""
    _, model = exported
    run = run_dpo(read_recipe(dpo_recipe(tmp_path, pref_file, from_model=str(model), model={"quantization": "nf4"},
                                         dpo={"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1})))
    first, _ = first_rewards(run)
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["reference"].startswith(f"from_model {model}")
    assert read_recipe(run / "recipe.yaml").model.quantization == "nf4"


def test_both_or_neither_is_a_validate_error_and_writes_nothing(tmp_path, pref_file, exported):
    sft, model = exported
    both = dpo_recipe(tmp_path, pref_file, from_run=str(sft), from_model=str(model))
    assert any(p.startswith("from_model: given together with from_run") for p in problems_of(both))
    with pytest.raises(UserError, match="from_model: given together with from_run"):
        run_dpo(read_recipe(both))
    neither = dpo_recipe(tmp_path, pref_file, "neither.yaml", dpo={"beta": 0.1})
    assert any(p.startswith("from_run: required, or from_model") for p in problems_of(neither, "dpo"))
    with pytest.raises(UserError, match="from_run: required, or from_model"):
        run_dpo(read_recipe(neither))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo.yaml", "neither.yaml"]  # no run, no staging


def test_from_model_checks(tmp_path, pref_file, exported, tiny_mixtral, sft_file):
    sft, model = exported
    # a hub id validates offline from the bundled config: no weights, no network
    checked = check(read_recipe(dpo_recipe(tmp_path, pref_file, from_model=HUB_ID)))
    assert checked.stage == "dpo" and checked.recipe.model.name_or_path == HUB_ID
    assert set(checked.targets.groups) == {"attention", "experts"}

    def problems(**keys):
        return problems_of(dpo_recipe(tmp_path, pref_file, **keys))

    assert problems(from_model="nobody/no-such-model")[0].startswith(
        "from_model: cannot load a config from `nobody/no-such-model`")  # offline: the hub cache and bundled configs only
    nope = f"from_model: ./nope: no such local directory (relative paths are read from {Path.cwd()})"
    assert problems(from_model="./nope") == [nope]
    assert any(p.startswith("from_model:") and "name it in from_run" in p for p in problems(from_model=str(sft)))
    assert any(p.startswith("from_model:") and "no config.json" in p for p in problems(from_model=str(tmp_path)))
    assert any(p.startswith("model.name_or_path:") and "differs from from_model" in p
               for p in problems(from_model=str(model), model={"name_or_path": str(tiny_mixtral)}))
    sft_with_model = sft_recipe(tmp_path, tiny_mixtral, sft_file, from_model=str(model))
    assert any(p.startswith("from_model: only DPO recipes") for p in problems_of(recipe_file(tmp_path, **sft_with_model), "sft"))
    assert problems(from_model=3) == ["from_model: expected str, got 3"]  # a wrong type: no traceback (nor for from_run)
    assert problems(from_run=3) == ["from_run: expected str, got 3"]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((model / "config.json").read_text())
    (damaged / "export.json").write_text("{not json")
    assert any(p.startswith("from_model:") and "export.json: not valid JSON" in p for p in problems(from_model=str(damaged)))


def test_pipeline_refuses_from_model(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "sft.yaml").write_text((REPO / "recipes" / "tiny-moe" / "sft.yaml").read_text())
    raw = yaml.safe_load((REPO / "recipes" / "tiny-moe" / "dpo.yaml").read_text())
    raw.pop("from_run")
    raw["from_model"] = str(TINY_MOE)
    (recipes / "dpo.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # the recipes' relative data paths do not exist here: nothing could train
    with pytest.raises(UserError, match="the pipeline trains DPO on the SFT run it has just made"):
        run_pipeline(str(recipes), [], with_passkey=False)
    assert [p.name for p in tmp_path.iterdir()] == ["recipes"]


def test_hub_id_records_the_cached_revision(tmp_path, monkeypatch):
    """A hub id names whatever its main branch holds today: the chain records the snapshot's commit,
    read offline from the hub cache (here a fake one: nothing is downloaded)."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    link = from_model.base_link("someone/tiny-instruct")
    assert link == {"kind": "base", "model": "someone/tiny-instruct", "from_model": True, "revision": commit}
    assert f"`someone/tiny-instruct` at revision {commit}" in from_model.describe(link)
    assert from_model.base_link("someone/not-cached") == {"kind": "base", "model": "someone/not-cached", "from_model": True}
