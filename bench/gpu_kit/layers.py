"""Part `bench`: training steps of 4 Mixtral-8x7B-shaped decoder layers, three LoRA paths side by side.

    python bench/gpu_kit/kit.py bench --out DIR [--dry-run]      # writes DIR/bench.json

Shapes (GPU): 4 layers, hidden 4096, intermediate 14336, 8 experts top-2, 32/8 heads (GQA), vocab
32000, 4 x 2048 tokens, LoRA r=16 (alpha 32), bf16 weights, AdamW, router frozen. Paths (defined
in bench/expert_lora.py, one base model, adapters swapped): `peft-grouped_mm` (stock PEFT
target_parameters, transformers' grouped_mm experts), `fast` (finetune/lora/fast_experts.py) and
`attn-only` (LoRA on q/k/v/o only: the floor, what the base path costs). SFT and DPO steps (DPO:
half the rows chosen, half rejected, plus a no-grad reference forward). Each figure is the median
of `steps` timed steps after `warmup` untimed ones, each step bracketed by a device synchronisation.
MFU: useful FLOPs (bench/expert_lora.py's flops_per_token: 4 x active parameters + causal
attention 6·seq·hidden per layer; DPO adds the reference forward) / median step time / 989
TFLOP/s. Peak memory: torch.cuda.max_memory_allocated per path and mode (CPU: peak RSS).
The file is rewritten after each path, so a later hang keeps the finished rows.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gpu_kit.common import (
    H100_BF16_DENSE_TFLOPS,
    Part,
    load_bench_script,
    summary,
    time_steps,
)

FULL = dict(layers=4, hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000,
            batch=4, seq=2048, rank=16, dtype="bf16", steps=7, warmup=2)
DRY = dict(layers=2, hidden=64, intermediate=128, experts=4, top_k=2, heads=4, kv_heads=2, vocab=128,
           batch=2, seq=32, rank=8, dtype="bf16", steps=2, warmup=1)
PATHS = ("peft-grouped_mm", "fast", "attn-only")
MODES = ("sft", "dpo")
# docs/gpu.md: the fast path against attention-only LoRA (the floor) and against stock PEFT (the moonshot)
TARGETS = {"fast_vs_attn_only_tokens_per_s": (">=", 0.95), "fast_vs_attn_only_peak_memory": ("<=", 1.10),
           "fast_vs_stock_tokens_per_s": (">=", 2.0), "fast_mfu": (">=", 0.50)}


def sft_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def dpo_step(el, model, opt, ids):
    with torch.no_grad(), model.disable_adapter():
        ref = el.seq_logps(model(input_ids=ids).logits, ids)
    pol = el.seq_logps(model(input_ids=ids).logits, ids)
    n = ids.shape[0] // 2
    loss = -F.logsigmoid(0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def measure_path(el, base, name, a) -> tuple:
    from peft import LoraConfig, get_peft_model

    from finetune.lora.fast_experts import enable_fast_expert_lora

    on_experts, impl, fast = el.PATHS[name]
    base.set_experts_implementation(impl)
    model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=el.ATTENTION,
                                            target_parameters=el.EXPERTS if on_experts else None))
    patched = enable_fast_expert_lora(model) if fast else 0
    if fast and patched != a.layers:
        raise RuntimeError(f"fast path patched {patched} of {a.layers} MoE layers")
    gen = torch.Generator(device=a.device).manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device, generator=gen)
    rows = []
    for mode in a.modes:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        losses = []
        step = (lambda: losses.append(sft_step(model, opt, ids))) if mode == "sft" else \
            (lambda: losses.append(dpo_step(el, model, opt, ids)))
        el.reset_peak(a.device)
        row = dict(path=name, mode=mode, fast_layers=patched)
        try:
            times = time_steps(step, a.device, a.warmup, a.steps)
        except torch.OutOfMemoryError:
            rows.append(dict(row, error="OOM"))
            del opt, losses
            continue
        tokens = a.batch * a.seq
        flops = tokens * el.flops_per_token(base.config, a.seq, True)
        if mode == "dpo":
            flops += tokens * el.flops_per_token(base.config, a.seq, False)
        s = summary(times)
        loss = [float(x) for x in losses]
        rows.append(dict(row, tokens_per_step=tokens, **s, tokens_per_s=tokens / s["step_s_median"],
                         flops_per_step=flops, mfu=flops / s["step_s_median"] / (a.peak_tflops * 1e12),
                         peak_gib=el.peak_gib(a.device),
                         reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if a.device == "cuda" else None,
                         loss_first=loss[0], loss_last=loss[-1], loss_finite=all(x == x and abs(x) < 1e30 for x in loss)))
        del opt, losses
    return model.unload(), rows


def targets(rows: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        by = {r["path"]: r for r in rows if r["mode"] == mode and "error" not in r}
        fast, attn, stock = by.get("fast"), by.get("attn-only"), by.get("peft-grouped_mm")
        values = {
            "fast_vs_attn_only_tokens_per_s": fast and attn and fast["tokens_per_s"] / attn["tokens_per_s"],
            "fast_vs_attn_only_peak_memory": fast and attn and attn["peak_gib"] and fast["peak_gib"] / attn["peak_gib"],
            "fast_vs_stock_tokens_per_s": fast and stock and fast["tokens_per_s"] / stock["tokens_per_s"],
            "fast_mfu": fast and fast["mfu"],
        }
        for key, value in values.items():
            op, bound = TARGETS[key]
            met = None if not value else (value >= bound if op == ">=" else value <= bound)
            out[f"{mode}:{key}"] = {"value": value or None, "target": f"{op} {bound}", "met": met}
    return out


def run(out, dry_run: bool) -> dict:
    el = load_bench_script("expert_lora")
    part = Part("bench", out, dry_run)
    cuda = torch.cuda.is_available() and not dry_run
    a = SimpleNamespace(**(DRY if dry_run else FULL), device="cuda" if cuda else "cpu", grad_checkpointing=False,
                        modes=list(MODES), peak_tflops=H100_BF16_DENSE_TFLOPS)
    if not cuda:
        torch.set_num_threads(1)
        part.skip("CUDA timings and peak memory", "no CUDA: tiny shapes on the CPU (peak RSS), not a GPU figure")
    part.data.update(shapes={k: getattr(a, k) for k in FULL}, device=a.device, peak_tflops=a.peak_tflops,
                     paths=list(PATHS), modes=list(MODES), rows=[], targets={})
    base = el.build_model(a)
    for name in PATHS:
        base, rows = measure_path(el, base, name, a)
        part.data["rows"] += rows
        part.data["targets"] = targets(part.data["rows"])
        part.write("partial")
        for r in rows:
            print(f"bench: {r['path']:<16} {r['mode']} " + (r.get("error") or
                  f"{r['tokens_per_s']:10.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gib']:.2f} GiB"), flush=True)
        gc.collect()
    bad = [f"{r['path']}/{r['mode']}" for r in part.data["rows"] if "error" in r or not r["loss_finite"]]
    part.error = f"errors or non-finite losses: {bad}" if bad else None
    part.write("failed" if bad else "ok")
    return part.data
