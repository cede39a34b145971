"""Export: merged checkpoint equals the adapter chain, loads with plain transformers, never half-written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import recipe_file, sft_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import export as export_mod
from finetune import runs
from finetune.errors import CheckFailed, UserError
from finetune.export import deltas, export, merge, shards
from finetune.load import chain
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
        lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 2, "alpha": 8}},  # expert rank != attention rank
        router={"policy": "train"},
        dpo={"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-2},
    )
    return run_dpo(read_recipe(dpo))


def _tensors(directory):
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_export_matches_chain_and_uses_standard_layout(tmp_path, dpo_run):
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = _tensors(out)
    assert len(set(index["weight_map"].values())) >= 3 and set(index["weight_map"]) == set(written)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in written
    assert not any("lora" in k or "modules_to_save" in k for k in written)

    # the keys and values transformers itself saves for the chain merged by PEFT in memory
    reference = chain.load_chain(runs.read_run(dpo_run), dtype="float32")
    reference.save_pretrained(tmp_path / "hf")
    saved = _tensors(tmp_path / "hf")
    assert set(saved) == set(written)
    for key, tensor in saved.items():
        torch.testing.assert_close(written[key], tensor, atol=1e-6, rtol=0)

    ids = torch.tensor([[1, 7, 11, 19, 23, 2]])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(runs.read_run(dpo_run).chain[0]["model"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert (exported(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
        # the trained routers were merged too
        assert not torch.equal(exported.model.layers[0].mlp.gate.weight, base.model.layers[0].mlp.gate.weight)

    checks = json.loads((out / "export.json").read_text())["checks"]
    assert checks["tensors"]["max_relative_error"] <= 1e-5 and checks["files"]["byte_identical"]
    assert checks["forward"]["merge_relative_error"] <= 1e-4 and checks["forward"]["mode"] == "full"
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids("</s>")


def test_bfloat16_export_passes_and_reports_its_rounding(tmp_path, dpo_run):
    # A correct bf16 merge after 3 steps at lr 5e-2 used to fail: the one logit tolerance measured
    # bf16's rounding of every weight, not the merge.
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="bfloat16")
    forward = json.loads((out / "export.json").read_text())["checks"]["forward"]
    assert forward["files_relative_error"] <= 1e-4 < forward["rounding_relative_error"]
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    # transformers 4.x reads rope_theta only (else Mixtral's default 1e6: another model, silently)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids", "attention_mask"]


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


def _python_block(markdown: str) -> str:
    return markdown.split("```python\n", 1)[1].split("```", 1)[0]


def test_model_card_snippet_runs_and_names_no_local_base(tmp_path, dpo_run, monkeypatch, capsys):
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    card = (out / "README.md").read_text()
    base = runs.read_run(dpo_run).chain[0]["model"]
    assert "base_model:" not in card and f"`{base}`" in card  # a local base is named in the text only
    assert ".tmp" not in card
    monkeypatch.chdir(tmp_path)  # the snippet names the export's directory, as a user next to it would
    exec(compile(_python_block(card), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_dpo_adapter_readme_recipe_rebuilds_the_export(tmp_path, dpo_run, capsys):
    run = runs.read_run(dpo_run)
    sft_run = run.chain[1]["run"]
    assert json.loads((dpo_run / "adapter_config.json").read_text())["base_model_name_or_path"] == sft_run
    readme = (dpo_run / "README.md").read_text()
    assert "Do not apply this adapter to the base model" in readme
    scope = {}
    exec(compile(_python_block(readme), "README.md", "exec"), scope)  # plain PEFT: merge SFT, then DPO on top
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 7, 11, 19, 23, 2]])
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](input_ids=ids).logits, exported(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_export_files_get_ordinary_permissions(tmp_path, dpo_run):
    old = os.umask(0o027)
    try:
        out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes


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
    first = _tensors(target)
    export(str(dpo_run), str(target), dtype="float32")
    assert all(torch.equal(first[k], t) for k, t in _tensors(target).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instruct"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a previous export"):
        export(str(dpo_run), str(foreign), dtype="float32")
    assert (foreign / "todo.txt").read_text() == "mine"


def test_wrong_delta_fails_the_tensor_check(tmp_path, dpo_run, monkeypatch):
    real = deltas.Term.value

    def off_by_one_percent(self):  # as if the merge had the scaling slightly wrong
        return real(self) * 1.01 if self.kind == "add" else real(self)

    monkeypatch.setattr(deltas.Term, "value", off_by_one_percent)
    with pytest.raises(CheckFailed, match="differs from base . the chain's deltas computed by PEFT"):
        export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_scrambled_layout_fails_the_forward_check(tmp_path, dpo_run, monkeypatch):
    real = merge.to_disk_layout

    def swap_experts(meta, param, value):  # as if the conversion to the on-disk layout mixed up two experts
        out = real(meta, param, value)
        a, b = (next((k for k in out if f".experts.{i}.w2." in k), None) for i in (0, 1))
        if a and b:
            out[a], out[b] = out[b], out[a]
        return out

    monkeypatch.setattr(merge, "to_disk_layout", swap_experts)
    with pytest.raises(CheckFailed, match="written checkpoint's logits differ"):
        export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_corrupted_file_fails_the_byte_check(tmp_path, dpo_run, monkeypatch):
    real = shards.ShardWriter.write

    def flip(self, key, tensor):  # as if the bytes on disk were not the merged tensor
        digest = shards.tensor_digest(tensor)
        real(self, key, -tensor if key.endswith("layers.1.self_attn.q_proj.weight") else tensor)
        return digest

    monkeypatch.setattr(shards.ShardWriter, "write", flip)
    with pytest.raises(CheckFailed, match="written tensors differ from the merged tensors"):
        export(str(dpo_run), str(tmp_path / "instruct"), dtype="bfloat16")
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


def test_exported_tokenizer_loads_with_a_class_4x_knows_and_same_ids(tmp_path):
    from conftest import TINY_MOE, TINY_TASKS

    from finetune import modeling
    from finetune.export.tokenizer_files import save_tokenizer
    from finetune.recipe import ModelSection

    tok = modeling.load_tokenizer(ModelSection(name_or_path=str(TINY_MOE)))
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # llama.cpp's converter reads this into tokenizer.ggml.add_space_prefix (no extra space after [INST])
    assert config["add_prefix_space"] is False
    again = AutoTokenizer.from_pretrained(tmp_path)
    prompts = [json.loads(line)["prompt"] for line in (TINY_TASKS / "test.jsonl").read_text().splitlines()]
    assert len(prompts) == 160
    for prompt in prompts:
        assert again.apply_chat_template(prompt, add_generation_prompt=True) == tok.apply_chat_template(prompt, add_generation_prompt=True)


def _random_adapter_chain(tmp_path, tokenizer, layers=5):
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False)
    base = tmp_path / "base"
    MixtralForCausalLM(config).save_pretrained(base)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"],
                      init_lora_weights=False)
    peft_model = get_peft_model(MixtralForCausalLM.from_pretrained(base), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, [tmp_path / "adapter"]


def test_truncated_forward_check_loads_first_middle_last_layers(tmp_path, tokenizer, monkeypatch):
    from safetensors.torch import load_file, save_file

    from finetune.export import verify

    base, adapters = _random_adapter_chain(tmp_path, tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    info = merge.merge_checkpoint(base, merge.read_chain(merge.load_config(base), adapters), out, torch.float32,
                                  progress=False)
    info["config"].save_pretrained(out)
    probe = torch.tensor([[1, 5, 9, 13, 17, 2]])
    monkeypatch.setattr(shards, "free_bytes_estimate", lambda: 10_000)  # "does not fit": auto truncates
    result = verify.forward_check(base, adapters, out, torch.float32, probe, "auto", tmp_path / "scratch")
    assert result["mode"] == "truncated to decoder layers [0, 2, 4]"
    assert result["merge_relative_error"] <= 1e-4 and result["files_relative_error"] <= 1e-4
    assert not (tmp_path / "scratch").exists()

    weights = load_file(out / "model.safetensors")
    weights["model.layers.2.self_attn.q_proj.weight"] = weights["model.layers.2.self_attn.q_proj.weight"] * -1
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckFailed, match="written checkpoint's logits differ"):
        verify.forward_check(base, adapters, out, torch.float32, probe, "truncated", tmp_path / "scratch")


def test_expert_deltas_are_computed_one_expert_at_a_time(tmp_path, dpo_run, monkeypatch):
    """The merge never builds a whole fused expert delta (for Mixtral-8x7B 3.8 GB per layer in
    float32): with Term.value refused for 3-D parameters the export still passes every check."""
    real = deltas.Term.value

    def whole(self):
        if len(self.shape) == 3:
            raise AssertionError(f"whole fused delta built for {self.param}")
        return real(self)

    monkeypatch.setattr(deltas.Term, "value", whole)
    out = export(str(dpo_run), str(tmp_path / "instruct"), dtype="float32")
    checks = json.loads((out / "export.json").read_text())["checks"]
    assert checks["tensors"]["max_relative_error"] <= 1e-5 and checks["forward"]["merge_relative_error"] <= 1e-4


def test_expert_boxes_follow_transformers_layout():
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4)
    meta = merge.disk_layout_model(config)
    gate_up = merge.expert_boxes(meta, "model.layers.0.mlp.experts.gate_up_proj", (4, 192, 64))
    down = merge.expert_boxes(meta, "model.layers.0.mlp.experts.down_proj", (4, 64, 96))
    key = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"
    assert gate_up == {**{key.format(e, "w1"): deltas.ExpertBox(e, (0, 96), (0, 64)) for e in range(4)},
                       **{key.format(e, "w3"): deltas.ExpertBox(e, (96, 192), (0, 64)) for e in range(4)}}
    assert down == {key.format(e, "w2"): deltas.ExpertBox(e, (0, 64), (0, 96)) for e in range(4)}
    assert merge.expert_boxes(meta, "model.layers.0.self_attn.q_proj.weight", (64, 64)) is None


def test_truncated_check_keeps_fewer_layers_when_three_exceed_two_shards(tmp_path, tokenizer):
    """One float32 layer of this model is 86.8 KB: three fit twice a single-file checkpoint, two
    (first, last) fit twice a 121 KB shard, and with 39 KB shards one layer (the last) is kept."""
    from transformers import AutoModelForCausalLM

    from finetune.export import verify

    base, _ = _random_adapter_chain(tmp_path, tokenizer)
    assert verify.truncated_layers(base, 5) == [0, 2, 4]
    model = AutoModelForCausalLM.from_pretrained(base)
    for shard, kept in (("120KB", [0, 4]), ("40KB", [4])):
        model.save_pretrained(tmp_path / shard, max_shard_size=shard)
        assert verify.truncated_layers(tmp_path / shard, 5) == kept
