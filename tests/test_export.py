"""Export: merged checkpoint equals the adapter chain, loads with plain transformers, never half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import recipe_file, sft_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import chain, export as export_mod, runs
from finetune.errors import CheckFailed, UserError
from finetune.export import export
from finetune.recipe import read_recipe
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_mixtral, sft_file, pref_file):
    tmp = tmp_path_factory.mktemp("chain")
    sft = run_sft(read_recipe(recipe_file(tmp, **sft_recipe(
        tmp, tiny_mixtral, sft_file, sft={"learning_rate": 5e-2, "max_steps": 3}, router={"policy": "train"}))))
    dpo = recipe_file(
        tmp, "dpo.yaml", output_dir=str(tmp / "dpo-run"), from_run=str(sft),
        data={"train": [str(pref_file)], "max_length": 64},
        lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
        router={"policy": "train"},
        dpo={"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-2},
    )
    return run_dpo(read_recipe(dpo))


def test_export_matches_chain_and_uses_standard_layout(tmp_path, dpo_run):
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    index = out / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(index), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any("lora" in k for k in keys)

    ids = torch.tensor([[1, 7, 11, 19, 23, 2]])
    reference = chain.load_chain(runs.read_run(dpo_run), dtype="float32")  # SFT and DPO merged in memory
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(runs.read_run(dpo_run).chain[0]["model"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert (exported(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
        # the trained routers were merged too
        assert not torch.equal(exported.model.layers[0].mlp.gate.weight, base.model.layers[0].mlp.gate.weight)

    manifest = json.loads((out / "export.json").read_text())
    assert manifest["probe_relative_error"] <= 1e-4
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "SFT" in card and "DPO" in card
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids("</s>")


def test_exported_checkpoint_chats_with_plain_transformers(tmp_path, dpo_run):
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="bfloat16")
    script = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "reverse lamp"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
assert gen.shape[1] > ids["input_ids"].shape[1]
assert tok.decode(ids["input_ids"][0]).startswith("<s>[INST] reverse lamp [/INST]")
assert "finetune" not in sys.modules
print("ok", str(model.dtype))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["ok", "torch.bfloat16"]


def test_interrupted_export_leaves_nothing(tmp_path, dpo_run, monkeypatch):
    target = tmp_path / "instruct"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod.GenerationConfig, "save_pretrained", boom)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        export(str(dpo_run), str(target), dtype="float32")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_export_twice_replaces_and_refuses_foreign_dirs(tmp_path, dpo_run):
    target = tmp_path / "instruct"
    export(str(dpo_run), str(target), dtype="float32")
    first = (target / "export.json").read_text()
    export(str(dpo_run), str(target), dtype="float32")
    assert (target / "export.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instruct"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a previous export"):
        export(str(dpo_run), str(foreign), dtype="float32")
    assert (foreign / "todo.txt").read_text() == "mine"


def test_merge_mismatch_fails_and_writes_nothing(tmp_path, dpo_run, monkeypatch):
    real = AutoModelForCausalLM.from_pretrained

    def corrupted(*args, **kwargs):  # as if a conversion on save had scrambled one expert
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.experts.down_proj[0].mul_(-1)
        return model

    monkeypatch.setattr(export_mod.AutoModelForCausalLM, "from_pretrained", corrupted)
    with pytest.raises(CheckFailed, match="differ from the adapter chain"):
        export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_export_of_unfinished_run_is_a_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="not a finished run"):
        export(str(tmp_path / "run"), str(tmp_path / "out"))


def test_eval_scores_each_kind_of_file(tmp_path, dpo_run, sft_file, pref_file):
    from conftest import write_jsonl

    from finetune.cli import main

    prompts = write_jsonl(tmp_path / "test.jsonl", [
        {"prompt": [{"role": "user", "content": "reverse lamp"}], "answer": "pmal", "task": "reverse"},
        {"prompt": [{"role": "user", "content": "reverse tiger"}], "answer": "regit", "task": "reverse"},
    ])
    out = tmp_path / "eval.json"
    assert main(["eval", str(dpo_run), "--data", str(prompts), "--data", str(pref_file), "--data", str(sft_file),
                 "--output", str(out), "--max-new-tokens", "4"]) == 0
    results = json.loads(out.read_text())["results"]
    assert 0.0 <= results[str(prompts)]["exact_match"] <= 1.0 and results[str(prompts)]["n"] == 2
    assert 0.0 <= results[str(pref_file)]["preference_accuracy"] <= 1.0
    assert results[str(sft_file)]["loss"] > 0 and results[str(sft_file)]["tokens"] > 0
