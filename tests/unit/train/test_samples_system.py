"""Sample prompts with a system turn follow data.system like the training rows: with a template that
refuses system turns (Mixtral's), `auto` folds them, so the first sample step does not crash."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import write_jsonl

from finetune.recipe.schema import SamplesSection
from finetune.train import samples


def test_sample_prompts_fold_a_system_turn_the_template_refuses(tmp_path, tokenizer):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse lamp"},
                        {"role": "assistant", "content": "pmal"}]}
    path = write_jsonl(tmp_path / "eval.jsonl", [row])
    added = []
    trainer = SimpleNamespace(add_callback=added.append, callback_handler=None)
    callback = samples.install(trainer, SamplesSection(prompts=1), [str(path)], tokenizer, tmp_path)
    assert added == [callback]
    assert callback.prompts == [[{"role": "user", "content": "be brief\n\nreverse lamp"}]]
    tokenizer.apply_chat_template(callback.prompts[0], tokenize=False, add_generation_prompt=True)  # renders
    kept = samples.install(trainer, SamplesSection(prompts=1), [str(path)], tokenizer, tmp_path, system="keep")
    assert kept.prompts[0][0]["role"] == "system"
