"""The bundled job in plain TRL + PEFT (this package is not imported for training), against the pipeline.

    python bench/stock_trl.py --seeds 42,1,2 [--only stock|project] [--out bench-out/stock-trl]

For each seed, two jobs on the bundled tiny model and data, each SFT then DPO:
- stock: TRL's SFTTrainer and DPOTrainer with a PEFT LoraConfig written here: the same base model,
  data (sft.jsonl + passkey_sft.jsonl; preference.jsonl), LoRA targets (attention q/k/v/o and the
  fused experts through `target_parameters`), ranks and alphas, learning rates, epochs, batch
  sizes, max lengths, cosine schedule with 3% warmup, router aux-loss coefficient, DPO beta and
  loss ([sigmoid, sft]); DPO trains a fresh LoRA on the merged SFT model. TRL's defaults
  otherwise (padded batches in random order). TRL cannot put `{% generation %}` markers into the
  bundled Mixtral-style template (its assistant-only loss refuses it), so each conversation is
  given as prompt (every turn but the last) + completion (the last assistant turn), which TRL
  trains completion-only: identical to the pipeline's masks on the 2620 single-turn rows, the
  first answer of the 100 two-turn rows untrained. Each stage's merged model is saved.
- project: `finetune sft` and `finetune dpo` on recipes/tiny-moe with `--set seed=N`.
Both are scored by the same exact-match code (`finetune eval --data data/tiny-tasks/test.jsonl`),
greedy, on the 160 held-out prompts. Prints one table (per seed and mean ± spread) with the wall
time of each training stage, and writes it as JSON beside the outputs. Measured figures belong in
bench/RESULTS.md with machine and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tiny-tasks"
BASE = REPO / "model" / "tiny-moe"


def stock_job(seed: int, out: Path) -> dict:
    """SFT then DPO in plain TRL + PEFT; returns wall seconds per stage and the merged model paths."""
    import torch
    from datasets import concatenate_datasets, load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    def lora() -> LoraConfig:
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"], task_type="CAUSAL_LM")

    common = dict(seed=seed, learning_rate=1e-3, num_train_epochs=3, per_device_train_batch_size=16,
                  lr_scheduler_type="cosine", warmup_steps=0.03, router_aux_loss_coef=0.02, report_to="none",
                  save_strategy="no", logging_steps=10, use_cpu=not torch.cuda.is_available(),
                  bf16=torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    sft_data = concatenate_datasets([load_dataset("json", data_files=str(DATA / f), split="train")
                                     .select_columns(["messages"]) for f in ("sft.jsonl", "passkey_sft.jsonl")])
    sft_data = sft_data.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                            remove_columns=["messages"])
    times = {}

    def train_merge_save(trainer, stage: str) -> None:
        t0 = time.perf_counter()
        trainer.train()
        times[f"{stage}_seconds"] = time.perf_counter() - t0
        merged = trainer.model.merge_and_unload()
        # TRL turned router logits on for the aux loss; saved that way, generation with a cache fails in
        # transformers' load-balancing loss (mask and logits lengths differ), so save as Mixtral ships
        merged.config.output_router_logits = False
        merged.save_pretrained(out / stage)
        tokenizer.save_pretrained(out / stage)

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out / "sft-ckpt"), max_length=224, **common)
    train_merge_save(SFTTrainer(model=model, args=args, train_dataset=sft_data, processing_class=tokenizer,
                                peft_config=lora()), "sft")

    set_seed(seed)
    pref = load_dataset("json", data_files=str(DATA / "preference.jsonl"), split="train")
    pref = pref.select_columns([c for c in ("prompt", "chosen", "rejected") if c in pref.column_names])
    model = AutoModelForCausalLM.from_pretrained(out / "sft", dtype=torch.float32)
    args = DPOConfig(output_dir=str(out / "dpo-ckpt"), max_length=128, beta=0.1, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, 1.0], **{**common, "logging_steps": 5})
    train_merge_save(DPOTrainer(model=model, args=args, train_dataset=pref, processing_class=tokenizer,
                                peft_config=lora()), "dpo")
    return {**times, "sft": str(out / "sft"), "dpo": str(out / "dpo")}


def project_job(seed: int, out: Path) -> dict:
    times = {}
    for stage, extra in (("sft", []), ("dpo", [f"from_run={out / 'sft'}"])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune", "-q", stage, str(REPO / "recipes" / "tiny-moe" / f"{stage}.yaml"),
                        "--set", f"seed={seed}", "--set", f"output_dir={out / stage}", *sum((["--set", e] for e in extra), [])],
                       check=True, cwd=REPO)
        times[f"{stage}_seconds"] = time.perf_counter() - t0  # includes loading and saving
    return {**times, "sft": str(out / "sft"), "dpo": str(out / "dpo")}


def exact_match(model: str, out: Path) -> float:
    result = out / f"eval-{Path(model).name}.json"
    subprocess.run([sys.executable, "-m", "finetune", "-q", "eval", model, "--data", str(DATA / "test.jsonl"),
                    "--output", str(result)], check=True, cwd=REPO, capture_output=True)
    results = json.loads(result.read_text())["results"]
    return next(v["exact_match"] for v in results.values() if isinstance(v, dict) and "exact_match" in v)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--only", choices=["stock", "project"])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "stock-trl")
    args = parser.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind, job in (("stock", stock_job), ("project", project_job)):
            if args.only and kind != args.only:
                continue
            out = args.out / f"{kind}-seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            done = job(seed, out)
            row = {"kind": kind, "seed": seed, **{k: v for k, v in done.items() if k.endswith("seconds")},
                   "sft_exact_match": exact_match(done["sft"], out), "dpo_exact_match": exact_match(done["dpo"], out)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| job | seed | SFT exact match | DPO exact match | SFT s | DPO s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['seed']} | {r['sft_exact_match']:.3f} | {r['dpo_exact_match']:.3f} | "
              f"{r['sft_seconds']:.0f} | {r['dpo_seconds']:.0f} |")
    for kind in ("stock", "project"):
        mine = [r for r in rows if r["kind"] == kind]
        if len(mine) > 1:
            for key in ("sft_exact_match", "dpo_exact_match", "sft_seconds"):
                values = [r[key] for r in mine]
                print(f"{kind} {key}: mean {statistics.mean(values):.3f}, min {min(values):.3f}, max {max(values):.3f}")


if __name__ == "__main__":
    main()
