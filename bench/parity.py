"""The transformers side of the serving-parity benches, and their negative control.

Imported by bench/llama_cpp_parity.py and bench/serve_parity.py (not run on its own): transformers'
greedy token ids on an export (stopping at its EOS, and without stopping), a perturbed copy of an
export that an engine must tell apart from the export, and the agreement counts both benches print.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def chat_rows(path: Path, limit: int = 0) -> list[dict]:
    """The chat rows ({"prompt": [messages], ...}) of a JSONL file, the first `limit` (0: all)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("prompt"), list)]
    return rows[:limit] if limit else rows


def eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


@torch.no_grad()
def hf_greedy(model, tokenizer, ids: list[int], eos: set[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy answer (generate, do_sample=False) to prompt `ids`, without the EOS it stops at."""
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    return [t for t in out[0, len(ids):].tolist() if t not in eos]


@torch.no_grad()
def greedy_no_stop(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens without stopping at EOS (vLLM's ignore_eos): argmax of transformers' forward with
    its KV cache, one token at a time. Not `generate`: its EOS handling (pad = EOS here, min_new_tokens
    masking the EOS logit) would make the ids after an EOS mean something else than the engine's."""
    input_ids, past, out = torch.tensor([ids]), None, []
    for _ in range(n):
        step = model(input_ids=input_ids, cache=past, use_cache=True)
        past, token = step.cache, int(step.logits[0, -1].argmax())
        out.append(token)
        input_ids = torch.tensor([[token]])
    return out


def transformers_greedy(export: Path, rows: list[dict], max_new_tokens: int) -> tuple[list[dict], set[int]]:
    """Per row: the prompt ids transformers builds from the export's chat template, its greedy answer
    stopping at the export's EOS ids, and `max_new_tokens` greedy ids without stopping; in float32."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    eos = eos_ids(model.generation_config)
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append({"text": text, "prompt_ids": ids, "ids": hf_greedy(model, tokenizer, ids, eos, max_new_tokens),
                    "no_stop_ids": greedy_no_stop(model, ids, max_new_tokens)})
    return out, eos


def perturb(export: Path, out: Path, scale: float, seed: int = 0) -> list[str]:
    """A copy of `export` with noise on every tensor of the last decoder layer; returns the keys changed."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(export, out)
    layers = json.loads((export / "config.json").read_text())["num_hidden_layers"]
    prefix = f"model.layers.{layers - 1}."
    gen = torch.Generator().manual_seed(seed)
    changed = []
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for key, t in tensors.items():
            if key.startswith(prefix) and t.is_floating_point() and t.numel() > 1:
                tensors[key] = t + scale * t.float().std() * torch.randn(t.shape, generator=gen).to(t.dtype)
                changed.append(key)
        save_file(tensors, shard, metadata={"format": "pt"})
    (out / "PERTURBED.txt").write_text(f"negative control: noise {scale} x std on {len(changed)} tensors of {prefix}*\n")
    return changed


def agreement(hf: list[dict], served: list[dict]) -> dict:
    """How many prompts an engine (`served`: prompt_ids, ids, no_stop_ids per row) matches transformers on."""
    return {"prompts": len(hf),
            "prompt_ids_identical": sum(a["prompt_ids"] == b["prompt_ids"] for a, b in zip(hf, served)),
            "generated_ids_identical": sum(a["ids"] == b["ids"] for a, b in zip(hf, served)),
            "generated_tokens_compared": sum(len(a["ids"]) for a in hf),
            "distinct_transformers_answers": len({tuple(a["ids"]) for a in hf}),
            "no_stop_identical": sum(a["no_stop_ids"] == b["no_stop_ids"] for a, b in zip(hf, served)),
            "no_stop_tokens_compared": sum(len(a["no_stop_ids"]) for a in hf),
            "no_stop_tokens_identical": sum(x == y for a, b in zip(hf, served) for x, y in zip(a["no_stop_ids"], b["no_stop_ids"]))}


@torch.no_grad()
def first_differences(export: Path, rows: list[dict], ours: str, theirs: str) -> list[dict]:
    """Where two greedy sequences (rows[i][ours] from transformers, rows[i][theirs] from an engine, after
    rows[i]["transformers_prompt_ids"]) first differ: the position, whether an EOS came before it, and
    transformers' logit of its own token minus its logit of the engine's there. A gap near 0 is a tie
    that float32 summation order can break either way; a large one is a different computation."""
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    eos = eos_ids(model.generation_config)
    out = []
    for row in rows:
        a, b = row[ours], row[theirs]
        if a == b:
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if k == min(len(a), len(b)):  # one is a prefix of the other: no token to compare
            out.append({"prompt": row["prompt"], "position": k, "logit_gap": None})
            continue
        logits = model(input_ids=torch.tensor([row["transformers_prompt_ids"] + a[:k]])).logits[0, -1]
        out.append({"prompt": row["prompt"], "position": k, "after_eos": any(t in eos for t in a[:k]),
                    "transformers_token": a[k], "engine_token": b[k],
                    "logit_gap": round(float(logits[a[k]] - logits[b[k]]), 6)})
    return out


def agrees(result: dict) -> bool:
    """Every prompt identical: prompt ids, greedy answer and the ids without stopping."""
    n = result["prompts"]
    return result["prompt_ids_identical"] == result["generated_ids_identical"] == result["no_stop_identical"] == n
