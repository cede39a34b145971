"""DPO starts from an SFT run and uses the SFT model as its reference; proven on a tiny Mixtral."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_pairs, recipe_file, sft_recipe, write_jsonl
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from finetune import runs
from finetune.errors import UserError
from finetune.recipe import read_recipe
from finetune.stages.dpo import build_trainer, run_dpo
from finetune.stages.sft import run_sft
from finetune.validate import check
from finetune.validate.resolve import absolute


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_mixtral, sft_file):
    tmp = tmp_path_factory.mktemp("sft")
    # A large learning rate so the SFT adapter is far from zero: base and SFT must differ clearly.
    recipe = sft_recipe(tmp, tiny_mixtral, sft_file, sft={"learning_rate": 5e-2, "max_steps": 4})
    return run_sft(read_recipe(recipe_file(tmp, **recipe)))


def dpo_recipe(tmp_path, sft_run, pref_file, expert_path="fast", **dpo):
    return recipe_file(
        tmp_path, "dpo.yaml",
        output_dir=str(tmp_path / "dpo-run"), from_run=str(sft_run),
        data={"train": [str(pref_file)], "max_length": 64},
        lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}, "expert_path": expert_path},
        dpo={"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2, **dpo},
    )


def make_trainer(tmp_path, sft_run, pref_file, expert_path="fast"):
    checked = check(read_recipe(dpo_recipe(tmp_path, sft_run, pref_file, expert_path)), "dpo")
    recipe = absolute(checked.recipe)
    trainer, *_ = build_trainer(recipe, checked, 0.02, runs.read_run(sft_run))
    return trainer


@pytest.mark.parametrize("expert_path", ["fast", "peft"])
def test_first_step_rewards_are_zero(tmp_path, sft_run, pref_file, expert_path):
    """Policy == reference at step 0, so every implicit reward is exactly 0."""
    trainer = make_trainer(tmp_path, sft_run, pref_file, expert_path)
    trainer.args.max_steps = 1
    trainer.train()
    first = next(e for e in trainer.state.log_history if "rewards/chosen" in e)
    assert first["rewards/chosen"] == 0.0
    assert first["rewards/rejected"] == 0.0
    assert first["rewards/margins"] == 0.0


def _sequence_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


def test_reference_is_base_plus_sft_adapter(tmp_path, sft_run, pref_file, tiny_mixtral):
    trainer = make_trainer(tmp_path, sft_run, pref_file)
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    got = torch.cat([ref_chosen, ref_rejected])

    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    with torch.no_grad():
        base_logps = _sequence_logps(base, batch)
        sft = PeftModel.from_pretrained(base, str(sft_run)).eval()  # unmerged, computed independently
        sft_logps = _sequence_logps(sft, batch)
    torch.testing.assert_close(got, sft_logps, atol=1e-4, rtol=1e-5)
    # and the check can fail: the base model (the bug other tools shipped) gives other numbers
    assert (got - base_logps).abs().max() > 1e-2


def test_dpo_run_records_chain_and_trains(tmp_path, sft_run, pref_file):
    out = run_dpo(read_recipe(dpo_recipe(tmp_path, sft_run, pref_file)))
    chain = json.loads((out / "chain.json").read_text())
    assert [c["kind"] for c in chain] == ["base", "sft", "dpo"]
    assert chain[1]["run"] == str(sft_run)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["router_aux_loss_coef"] == 0.02
    assert any("rewards/margins" in e for e in metrics["log_history"])
    resolved = read_recipe(out / "recipe.yaml")
    assert resolved.model.name_or_path == runs.read_run(sft_run).recipe.model.name_or_path


def test_bad_preference_rows_name_file_and_row(tmp_path, sft_run):
    rows = make_pairs(4)
    rows[2]["rejected"] = rows[2]["chosen"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError) as info:
        run_dpo(read_recipe(dpo_recipe(tmp_path, sft_run, path)))
    assert f"{path}:3: chosen equals rejected" in str(info.value)
    del rows[1]["rejected"]
    path = write_jsonl(tmp_path / "pairs2.jsonl", rows)
    with pytest.raises(UserError, match=r"pairs2.jsonl:2: missing rejected"):
        run_dpo(read_recipe(dpo_recipe(tmp_path, sft_run, path)))


def test_dpo_needs_a_finished_sft_run(tmp_path, pref_file):
    with pytest.raises(UserError, match="from_run: run directory not found"):
        check(read_recipe(dpo_recipe(tmp_path, tmp_path / "nope", pref_file)), "dpo")


def test_precomputed_reference_gives_the_same_first_step(tmp_path, sft_run, pref_file):
    """dpo.precompute_ref_log_probs goes through TRL's own path, with the same SFT reference."""
    out = run_dpo(read_recipe(dpo_recipe(tmp_path, sft_run, pref_file, precompute_ref_log_probs=True, max_steps=1)))
    first = next(e for e in json.loads((out / "metrics.json").read_text())["log_history"] if "rewards/chosen" in e)
    # precomputed in other batches (other padding), so equal up to float rounding, not bit for bit
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


class KeepBest(TrainerCallback):
    """The best checkpoint's adapter and the evaluations, read before finish removes the checkpoints."""

    def on_train_end(self, args, state, control, **kwargs):
        self.best = state.best_model_checkpoint
        self.tensors = load_file(f"{self.best}/adapter_model.safetensors")
        self.last = load_file(f"{args.output_dir}/checkpoint-{state.global_step}/adapter_model.safetensors")
        self.evals = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]


def test_early_stopping_keeps_the_best_checkpoints_adapter_and_samples_are_written(tmp_path, sft_run, pref_file, capsys):
    """A forced trigger: `mode: max` on eval_loss, which falls as DPO trains, so every evaluation
    after the first is worse; the run stops after one (patience 1) and keeps step 2's adapter."""
    path = dpo_recipe(tmp_path, sft_run, pref_file, max_steps=8, save_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["eval"] = [str(pref_file)]
    path.write_text(yaml.safe_dump({**raw, "early_stopping": {"metric": "eval_loss", "patience": 1, "mode": "max"},
                                    "samples": {"every": 2, "prompts": 1, "max_new_tokens": 3}}))
    keep = KeepBest()
    out = run_dpo(read_recipe(path), callbacks=[keep])
    (step2, loss2), (step4, loss4) = keep.evals
    assert (step2, step4) == (2, 4) and loss4 < loss2, "the premise: eval_loss fell between the checkpoints"
    assert keep.best.endswith("checkpoint-2")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["early_stopping"] == {"metric": "eval_loss", "best_step": 2, "best_metric": loss2,
                                         "last_step": 4, "stopped_early": True}
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == keep.tensors.keys() and all(torch.equal(saved[k], keep.tensors[k]) for k in saved)
    assert any(not torch.equal(saved[k], keep.last[k]) for k in saved)  # the last step's adapter differs
    assert "early stopping: stopped early at step 4; adapter from the best checkpoint, step 2" in capsys.readouterr().out
    # sample answers in DPO: the first eval pair's prompt (its `prompt` turns), at each step they were due
    first = json.loads(pref_file.read_text().splitlines()[0])["prompt"][-1]["content"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(2, first), (4, first)] and all(isinstance(r["answer"], str) for r in rows)
