"""Sample answers and early stopping in a real SFT run of the bundled default (model/tiny-moe,
data/tiny-tasks): what samples.jsonl holds, which adapter the run keeps, what the summary says."""

from __future__ import annotations

import json

import torch
from conftest import REPO
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft
from finetune.train.samples import prompt_of, read_prompts


class KeepBest(TrainerCallback):
    """The best checkpoint's adapter, read before finish removes the checkpoints."""

    def on_train_end(self, args, state, control, **kwargs):
        self.best = state.best_model_checkpoint
        self.tensors = load_file(f"{self.best}/adapter_model.safetensors")
        self.evals = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]


def test_samples_and_early_stopping_on_the_bundled_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    # mode max on eval_loss: a falling loss is a worsening metric, so the run must stop after
    # `patience` evaluations and keep the first checkpoint's adapter
    recipe = read_recipe("recipes/tiny-moe/sft.yaml", [
        f"output_dir={tmp_path / 'run'}", "sft.max_steps=8", "sft.save_steps=2", "sft.logging_steps=1",
        "sft.per_device_train_batch_size=8",
        "samples={every: 2, prompts: 2, max_new_tokens: 6}",
        "early_stopping={metric: eval_loss, patience: 1, mode: max}"])
    keep = KeepBest()
    out = run_sft(recipe, callbacks=[keep])

    (step2, loss2), (step4, loss4) = keep.evals
    assert (step2, step4) == (2, 4) and loss4 < loss2, "the premise: eval_loss fell between the checkpoints"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["early_stopping"] == {"metric": "eval_loss", "best_step": 2, "best_metric": loss2,
                                         "last_step": 4, "stopped_early": True}
    assert keep.best.endswith("checkpoint-2")
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == keep.tensors.keys() and all(torch.equal(saved[k], keep.tensors[k]) for k in saved)
    assert "early stopping: stopped early at step 4; adapter from the best checkpoint, step 2" in capsys.readouterr().out

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = read_prompts(2, ["data/tiny-tasks/sft_eval.jsonl"])
    first = [prompt_of(json.loads(line)) for line in open("data/tiny-tasks/sft_eval.jsonl").readlines()[:2]]
    assert prompts == first and all(p[-1]["role"] == "user" for p in prompts)
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p[-1]["content"]) for s in (2, 4) for p in prompts]
    assert all(isinstance(r["answer"], str) for r in rows)
    assert not (out / "checkpoints").exists()
