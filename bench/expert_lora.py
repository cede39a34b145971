"""Training-step throughput of expert-LoRA paths on a Mixtral-shaped model with random weights.

Side by side in one process, on one base model: stock PEFT target_parameters with grouped_mm
experts, the same with eager experts, attention-only LoRA, and finetune/expert_lora.py's fast
path. SFT steps (forward + backward + AdamW) and DPO steps (chosen + rejected through the
policy, plus a no-grad reference forward with adapters disabled). Prints tokens/s, 4N-MFU and
peak memory (CUDA: max allocated; CPU: peak RSS, reset per path via /proc/self/clear_refs).

Run:  python bench/expert_lora.py                      # 4 layers, H 4096, I 14336, 8x top-2, bf16, 4x2048
      python bench/expert_lora.py --tiny               # small shapes on CPU, well under a minute
      python bench/expert_lora.py --paths fast,attn-only --modes sft --json out.json
See bench/README.md for the FLOP count and where results go.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notes PEFT triggers

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PATHS = {  # name: (LoRA on experts, experts implementation, fast path)
    "peft-grouped_mm": (True, "grouped_mm", False),
    "peft-eager": (True, "eager", False),
    "attn-only": (False, "grouped_mm", False),
    "fast": (True, "grouped_mm", True),
}
FULL = dict(layers=4, hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000,
            batch=4, seq=2048, rank=16, dtype="bf16", steps=5, warmup=2)
TINY = dict(layers=2, hidden=128, intermediate=256, experts=8, top_k=2, heads=4, kv_heads=2, vocab=512,
            batch=4, seq=64, rank=8, dtype="fp32", steps=3, warmup=2)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes, fp32, CPU-friendly")
    for key, val in FULL.items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=str if key == "dtype" else int, default=None, help=f"default {val} (tiny {TINY[key]})")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of: " + ", ".join(PATHS))
    p.add_argument("--modes", default="sft,dpo", help="comma list of: sft, dpo")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak for MFU (989 = H100 SXM bf16 dense)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--tiny: 1)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for key, val in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.tiny and args.threads is None:
        args.threads = 1  # tiny matmuls gain nothing from threads; on a shared box they spin-wait
    args.paths, args.modes = args.paths.split(","), args.modes.split(",")
    bad = [x for x in args.paths if x not in PATHS] + [x for x in args.modes if x not in ("sft", "dpo")]
    if bad or args.dtype not in DTYPES:
        p.error(f"unknown: {', '.join(bad) or args.dtype}")
    if "dpo" in args.modes and args.batch % 2:
        p.error("--batch must be even for dpo: half chosen rows, half rejected rows")
    return args


def build_model(a):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
        num_experts_per_tok=a.top_k, max_position_embeddings=max(a.seq, 128), router_aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    with torch.device(a.device):
        model = MixtralForCausalLM._from_config(config, dtype=DTYPES[a.dtype])
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def flops_per_token(c, seq: int, train: bool) -> float:
    """4N (forward 2N + input-gradient 2N; frozen weights get no weight gradient) plus the causal
    attention core, 6·seq·hidden per layer; a forward-only pass counts 2N + 2·seq·hidden."""
    hd = c.hidden_size // c.num_attention_heads
    attn = 2 * c.hidden_size * c.num_attention_heads * hd + 2 * c.hidden_size * c.num_key_value_heads * hd
    moe = c.hidden_size * c.num_local_experts + c.num_experts_per_tok * 3 * c.hidden_size * c.intermediate_size
    n_active = c.num_hidden_layers * (attn + moe) + c.hidden_size * c.vocab_size  # lm_head; embedding is a lookup
    core = c.num_hidden_layers * c.hidden_size * seq
    return 4 * n_active + 6 * core if train else 2 * n_active + 2 * core


def seq_logps(logits, ids):
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return logp.view(ids.shape[0], -1).sum(-1)


def sft_step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def dpo_step(model, opt, ids):
    # ids: chosen rows then rejected rows, concatenated as TRL does; the reference is the base model
    with torch.no_grad(), model.disable_adapter():
        ref = seq_logps(model(input_ids=ids).logits, ids)
    pol = seq_logps(model(input_ids=ids).logits, ids)
    n = ids.shape[0] // 2
    margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    (-F.logsigmoid(0.1 * margin).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # hand freed heap back to the OS, then "5" resets this process's peak RSS (VmHWM) to now
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gib(device) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration):
        return None


def bench_path(base, name, a):
    from peft import LoraConfig, get_peft_model

    from finetune.lora.fast_experts import enable_fast_expert_lora

    on_experts, impl, fast = PATHS[name]
    base.set_experts_implementation(impl)
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=ATTENTION,
                     target_parameters=EXPERTS if on_experts else None)
    model = get_peft_model(base, cfg)
    if fast and enable_fast_expert_lora(model) != a.layers:
        raise RuntimeError("fast path did not patch every MoE layer")
    gen = torch.Generator(device=a.device).manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device, generator=gen)
    c = base.config
    rows = []
    for mode in a.modes:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        step = sft_step if mode == "sft" else dpo_step
        reset_peak(a.device)
        row = dict(path=name, mode=mode)
        try:
            for _ in range(a.warmup):
                step(model, opt, ids)
            sync(a.device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(model, opt, ids)
            sync(a.device)
            sec = (time.perf_counter() - t0) / a.steps
        except torch.OutOfMemoryError:
            rows.append(dict(row, error="OOM"))
            del opt
            continue
        tokens = a.batch * a.seq  # trained tokens per step (DPO: chosen + rejected rows)
        flops = tokens * flops_per_token(c, a.seq, True)
        if mode == "dpo":  # plus the reference forward over the same rows
            flops += tokens * flops_per_token(c, a.seq, False)
        rows.append(dict(row, tokens_per_s=tokens / sec, step_ms=sec * 1e3,
                         mfu=flops / sec / (a.peak_tflops * 1e12), peak_gib=peak_gib(a.device)))
        del opt
    return model.unload(), rows  # unload gives back the bare base model for the next path


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = build_model(a)
    rows = []
    for name in a.paths:
        base, got = bench_path(base, name, a)
        rows += got
        gc.collect()
    report(a, rows)


def report(a, rows):
    import peft
    import transformers

    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu"
    meta = dict(device=dev, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), threads=torch.get_num_threads(),
                **{k: getattr(a, k) for k in FULL}, grad_checkpointing=a.grad_checkpointing, peak_tflops=a.peak_tflops)
    print(f"# {meta['command']}\n# {dev} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| peft {peft.__version__}\n# {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, "
          f"{a.experts} experts top-{a.top_k}, batch {a.batch}x{a.seq}, r={a.rank}, {a.dtype}")
    mem = "peak GiB" if a.device.startswith("cuda") else "peak RSS GiB"
    print(f"{'path':<16} {'mode':<4} {'tok/s':>10} {'step ms':>9} {'MFU %':>6} {mem:>12} {'vs peft-grouped_mm':>19}")
    ref = {r["mode"]: r.get("tokens_per_s") for r in rows if r["path"] == "peft-grouped_mm"}
    for r in rows:
        if "error" in r:
            print(f"{r['path']:<16} {r['mode']:<4} {r['error']:>10}")
            continue
        ratio = f"{r['tokens_per_s'] / ref[r['mode']]:.2f}x" if ref.get(r["mode"]) else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['path']:<16} {r['mode']:<4} {r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} "
              f"{100 * r['mfu']:>6.2f} {peak:>12} {ratio:>19}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))


if __name__ == "__main__":
    main()
