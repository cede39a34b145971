"""Sample answers while training: greedy answers to a few prompts every N steps, to
`<run>/samples.jsonl` (step, prompt, answer) and to the loggers as text.

    finetune sft RECIPE       # with `samples: {every: 50, prompts: 4, max_new_tokens: 64}` in the recipe

prompts: a .jsonl/.json/.parquet file of rows with `prompt` (text or messages) or `messages`
(the turns before the last assistant turn are the prompt), or a count: the first rows of
data.eval. Every rank generates the same prompts in lockstep (`synced_gpus` when there are
several processes: under FSDP2/ZeRO-3 each forward gathers weights with a collective, so a rank
that stopped early would hang the others); rank 0 writes. On --resume, samples after the
checkpoint's step are dropped before training continues, so no step appears twice.
Layer: train; imports data, errors (torch is already loaded by the stages).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.data.files import read_rows
from finetune.data.rows import RowError, apply_system, as_messages, check_messages
from finetune.data.sources import read_shaped
from finetune.data.templates import system_choice
from finetune.errors import UserError

log = logging.getLogger("finetune")
FILE = "samples.jsonl"


def prompt_of(row: dict) -> list[dict]:
    """The conversation to answer: `prompt` (text or messages), or `messages` up to its last assistant turn."""
    if "prompt" in row:
        return check_messages(as_messages(row["prompt"], "user", "prompt"), "prompt", last_role=None)
    if "messages" in row:
        messages = check_messages(row["messages"], last_role=None)
        while messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if messages:
            return messages
    raise RowError(f"expected `prompt` or `messages` with a user turn; found keys {sorted(row)}")


def read_prompts(prompts: int | str, eval_sources: list[str]) -> list[list[dict]]:
    """The prompts of a `samples:` section (validate checked the file or the eval data exists)."""
    sources = [prompts] if isinstance(prompts, str) else list(eval_sources)
    out = []
    for source in sources:
        for row in read_rows(source) if isinstance(prompts, str) else read_shaped(source):  # eval data: its format
            try:
                out.append(prompt_of(row.value))
            except RowError as exc:
                raise UserError(f"samples.prompts: {row.source} row {row.number}: {exc}") from None
            if isinstance(prompts, int) and len(out) == prompts:
                return out
    return out


def as_text(prompt: list[dict]) -> str:
    """The last user turn: what a reader recognises the prompt by."""
    return next(str(m.get("content")) for m in reversed(prompt) if m.get("role") == "user") if any(
        m.get("role") == "user" for m in prompt) else str(prompt[-1].get("content"))


class SamplesCallback(TrainerCallback):
    """Greedy answers every `every` optimizer steps and at the last step; see the module docstring."""

    def __init__(self, prompts: list[list[dict]], tokenizer, every: int, max_new_tokens: int, staging: Path,
                 callback_handler):
        self.prompts, self.tokenizer, self.every, self.max_new_tokens = prompts, tokenizer, every, max_new_tokens
        self.path = staging / FILE
        self.handler = callback_handler  # the trainer's reporters receive the answers as text

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():  # --resume: keep what the checkpoint covers
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every and step != state.max_steps:
            return
        answers = self.generate(model, synced=args.world_size > 1)
        if not state.is_world_process_zero:
            return
        rows = [{"step": step, "prompt": as_text(p), "answer": a} for p, a in zip(self.prompts, answers)]
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.report(rows, step)

    @torch.no_grad()
    def generate(self, model, synced: bool) -> list[str]:
        was_training = model.training
        model.eval()  # no dropout: the answer of the weights as they are
        device = next(model.parameters()).device
        answers = []
        try:
            for prompt in self.prompts:  # one at a time: a few prompts, and no padding side to get right
                text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
                out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, synced_gpus=synced,
                                     pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
                answers.append(self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        finally:
            model.train(was_training)
        return answers

    def report(self, rows: list[dict], step: int) -> None:
        """The answers as text in each logger: TensorBoard text, W&B and trackio tables, MLflow tags."""
        from transformers.integrations import (  # the reporters' classes; their libraries are loaded already
            MLflowCallback,
            TensorBoardCallback,
            TrackioCallback,
            WandbCallback,
        )

        text = "\n\n".join(f"**{r['prompt']}**\n\n{r['answer']}" for r in rows)
        for cb in self.handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                cb.tb_writer.add_text("samples", text, step)
                cb.tb_writer.flush()
            elif isinstance(cb, WandbCallback) and cb._wandb is not None and cb._wandb.run is not None:
                table = cb._wandb.Table(columns=["step", "prompt", "answer"], data=[[r["step"], r["prompt"], r["answer"]] for r in rows])
                cb._wandb.log({"samples": table, "train/global_step": step})
            elif isinstance(cb, TrackioCallback) and cb._initialized:  # a run is open (rank 0 only gets here)
                table = cb._trackio.Table(columns=["step", "prompt", "answer"], data=[[r["step"], r["prompt"], r["answer"]] for r in rows])
                cb._trackio.log({"samples": table, "train/global_step": step})
            elif isinstance(cb, MLflowCallback) and cb._ml_flow is not None and cb._ml_flow.active_run() is not None:
                # a tag, not an artifact: the artifact store's recorded path is the staging directory's,
                # which finish renames; tags live in the tracking store. MLflow caps a tag at 8000 characters.
                cb._ml_flow.set_tag(f"samples/step_{step:07d}", text[:8000])


def install(trainer, section, eval_sources: list[str], tokenizer, staging: Path, system: str = "auto") -> SamplesCallback | None:
    if not section:
        return None
    how = system_choice(tokenizer, system)  # data.system, as the training rows had it: a refused system turn is folded
    prompts = [apply_system(p, how)[0] for p in read_prompts(section.prompts, eval_sources)]
    callback = SamplesCallback(prompts, tokenizer, section.every, section.max_new_tokens, staging, trainer.callback_handler)
    trainer.add_callback(callback)
    log.info("sample answers to %d prompt(s) every %d steps -> %s", len(prompts), section.every, FILE)
    return callback
