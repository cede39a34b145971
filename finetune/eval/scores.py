"""Evaluation of a base model, a run (adapter chain) or an exported checkpoint.

    finetune eval runs/tiny-moe/dpo --data data/tiny-tasks/test.jsonl --data data/tiny-tasks/preference.jsonl

Each data file is scored by what its rows hold:
- `answer` (with a `prompt`): exact match of the greedy answer (stripped), per `task` if present;
- `messages` or `prompt`+`completion`: mean loss per assistant token;
- `prompt`+`chosen`+`rejected`: preference accuracy, the share of pairs whose chosen answer has
  the higher log-probability.
Prints a table and, with --output, writes the figures as JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.data.files import read_rows
from finetune.data.masks import tokenize_sft
from finetune.data.rows import RowError, as_messages, check_messages, message_text, sft_messages
from finetune.errors import UserError
from finetune.eval import cli as long_context
from finetune.eval.report import write_atomic
from finetune.load.chain import load_for_inference


def _kind(row: dict, where: str) -> str:
    if "answer" in row:
        return "exact_match"
    if "chosen" in row and "rejected" in row:
        return "preference_accuracy"
    if "messages" in row or ("prompt" in row and "completion" in row):
        return "loss"
    raise UserError(f"{where}: cannot tell what to score in a row with keys {sorted(row)}: give `prompt` + `answer`, "
                    "`messages` (or `prompt` + `completion`), or `prompt` + `chosen` + `rejected`")


def _checked_row(row, kind: str) -> dict:
    """The row with its fields checked for `kind` scoring and text-part content joined."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    need = {"exact_match": ("prompt", "answer"), "loss": (), "preference_accuracy": ("prompt", "chosen", "rejected")}[kind]
    missing = [k for k in need if k not in row]
    if missing:
        raise RowError(f"missing {', '.join(f'`{k}`' for k in missing)} (a file is scored by what its first row holds: {kind})")
    if kind == "loss":
        sft_messages(row)
        return row
    out = dict(row)
    if kind == "exact_match":
        prompt = row["prompt"]
        out["prompt"] = message_text(prompt, "prompt") if isinstance(prompt, str) else \
            check_messages(as_messages(prompt, "user", "prompt"), "prompt", last_role="user")
        return out
    prompt = row["prompt"]
    if all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected")):
        for k in ("prompt", "chosen", "rejected"):
            message_text(row[k], k)
        return out
    out["prompt"] = check_messages(as_messages(prompt, "user", "prompt"), "prompt", last_role="user")
    for side in ("chosen", "rejected"):
        out[side] = check_messages(out["prompt"] + as_messages(row[side], "assistant", side), f"prompt+{side}")[len(out["prompt"]):]
    return out


def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(check_messages(prompt, "prompt", last_role="user"), tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    tokenizer.padding_side = "left"  # generation continues from the right edge of every prompt
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    hits, per_task, samples = 0, defaultdict(lambda: [0, 0]), []
    for start in tqdm(range(0, len(rows), batch_size), desc="exact match", leave=False):
        batch = rows[start:start + batch_size]
        texts = [_prompt_text(tokenizer, r["prompt"]) for r in batch]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
        for row, ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            ok = answer == str(row["answer"]).strip()
            hits += ok
            task = per_task[row.get("task", "all")]
            task[0] += ok
            task[1] += 1
            if len(samples) < 5:
                samples.append({"expected": row["answer"], "got": answer})
    return {"exact_match": hits / max(len(rows), 1), "n": len(rows),
            "per_task": {k: v[0] / v[1] for k, v in sorted(per_task.items())}, "samples": samples}


def _completion_logps(model, tokenizer, item, from_turn: int = 0) -> tuple[float, int]:
    """Sum of log-probs of the assistant tokens (from from_turn on) and their count."""
    enc = tokenize_sft(tokenizer, item, assistant_only=True, from_turn=from_turn)
    ids = torch.tensor([enc["input_ids"]], device=model.device)
    mask = torch.tensor([enc["assistant_masks"]], device=model.device)[:, 1:].bool()
    logits = model(input_ids=ids).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logps[mask].sum().item(), int(mask.sum())


@torch.no_grad()
def sft_loss(model, tokenizer, rows: list[dict]) -> dict:
    total, count = 0.0, 0
    for row in tqdm(rows, desc="loss", leave=False):
        logp, n = _completion_logps(model, tokenizer, sft_messages(row))
        total, count = total - logp, count + n
    return {"loss": total / max(count, 1), "n": len(rows), "tokens": count}


@torch.no_grad()
def preference_accuracy(model, tokenizer, rows: list[dict]) -> dict:
    wins = 0
    for row in tqdm(rows, desc="preference", leave=False):
        scores = []
        for side in ("chosen", "rejected"):
            prompt, completion = row["prompt"], row[side]
            if isinstance(prompt, str) and isinstance(completion, str):
                scores.append(_completion_logps(model, tokenizer, (prompt, completion))[0])
                continue
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            scores.append(_completion_logps(model, tokenizer, prompt + completion, from_turn=len(prompt))[0])
        wins += scores[0] > scores[1]
    return {"preference_accuracy": wins / max(len(rows), 1), "n": len(rows)}


def evaluate(model, tokenizer, files: list[str], max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    results = {}
    for path in files:
        numbered = read_rows(path)
        if not numbered:
            raise UserError(f"{path}: no rows to evaluate")
        if not isinstance(numbered[0].value, dict):
            raise UserError(f"{path}:{numbered[0].number}: expected a JSON object, got {type(numbered[0].value).__name__}")
        kind = _kind(numbered[0].value, f"{path}:{numbered[0].number}")
        rows = []
        for row in numbered:  # every row checked before the model runs, each error with its file:row
            try:
                rows.append(_checked_row(row.value, kind))
            except RowError as exc:
                raise UserError(f"{path}:{row.number}: {exc}") from None
        try:
            if kind == "exact_match":
                results[path] = exact_match(model, tokenizer, rows, max_new_tokens, batch_size)
            elif kind == "loss":
                results[path] = sft_loss(model, tokenizer, rows)
            else:
                results[path] = preference_accuracy(model, tokenizer, rows)
        except (RowError, KeyError) as exc:
            raise UserError(f"{path}: a row does not fit `{kind}` scoring: {exc}") from None
    return results


def format_table(name: str, results: dict) -> str:
    lines = [f"model: {name}", f"{'data':<44} {'metric':<22} {'value':>8} {'n':>6}"]
    for path, figures in results.items():
        for metric in ("exact_match", "loss", "preference_accuracy"):
            if metric in figures:
                lines.append(f"{Path(path).name:<44} {metric:<22} {figures[metric]:>8.4f} {figures['n']:>6}")
        for task, value in figures.get("per_task", {}).items():
            if len(figures["per_task"]) > 1:
                lines.append(f"{'':<44} {'  ' + task:<22} {value:>8.4f}")
    return "\n".join(lines)


def evaluate_cli(args) -> int:
    """`finetune eval`: the data scores, then passkey / long-context perplexity; with --output, all
    of them in one JSON file (`results` per data file, `passkey`, `long_ppl`), beside --report-dir's files."""
    request = long_context.check_args(args)
    model, tokenizer = load_for_inference(args.model, args.dtype, args.device)
    results = {}
    if args.data:
        results = evaluate(model, tokenizer, args.data, args.max_new_tokens, args.batch_size)
        print(format_table(args.model, results))
    extra = long_context.run(model, tokenizer, args, request)
    if args.output:  # cli.check_output_path has refused paths we could not or should not write
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps({"model": args.model, "results": results, **extra}, indent=2))
        print(f"written: {out}")
    return 0
