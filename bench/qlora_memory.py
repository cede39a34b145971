"""Resident memory of a 4-bit (QLoRA) Mixtral-architecture model, measured, and what that means for Mixtral-8x7B.

    python bench/qlora_memory.py                 # model/tiny-moe and a random ~1.5 GB Mixtral-shaped model
    python bench/qlora_memory.py --only-tiny
    python bench/qlora_memory.py --bounded-load [--layers 24] [--limit-share 0.5]   # the load's peak, under a limit
    python bench/qlora_memory.py --bounded-load --family gpt_oss --layers 16        # the same for a second expert layout
    python bench/qlora_memory.py --bounded-load --family gpt_oss_mxfp4 --layers 16  # ... with MXFP4 experts, as gpt-oss ships

Each load runs in a fresh subprocess so its peak RSS (VmHWM) is its own: the 16-bit model as
transformers loads it, and the same checkpoint through finetune.qlora.loading.load_quantized. Reported
per model: the tensors' byte counts by kind (NF4 experts with their quantization state,
bitsandbytes Linear4bit with theirs, everything else in 16/32-bit), RSS after the load (VmRSS,
after gc and malloc_trim; also split into anonymous memory and file-backed pages, which are
the mmap-ed safetensors) and the peak (VmHWM), per parameter of the original model. From the measured bytes
per 4-bit parameter it then computes Mixtral-8x7B's training memory on one GPU: weights + LoRA
(attention and experts, r=16) + AdamW state + activations at 4k tokens with gradient
checkpointing (a computed estimate, not a GPU measurement).

--bounded-load builds a random Mixtral-architecture checkpoint (24 layers: 4.4 GB in bfloat16,
200 MB shards) and loads it in 4-bit twice, each in a fresh process: once free, reporting VmHWM
(which counts the mmap-ed checkpoint's pages too) and the sampled peak of anonymous memory, and
once inside a memory cgroup limited to half the checkpoint's size, where the kernel drops file
pages to stay under the limit and OOM-kills a load whose own memory does not fit. Both loads:
finetune's (experts quantized as they stream in) and the stock 4-bit load with the experts
quantized afterwards. Needs a writable memory cgroup (root on a Linux machine, v1 or v2).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _anon_peak_sampler(every_s: float = 0.002):
    """A thread sampling RssAnon (the process's own memory, no file pages) and keeping the largest:
    VmHWM also counts the mmap-ed checkpoint's pages, which the kernel can drop at any time."""
    import threading

    peak, stop = [0], threading.Event()

    def run():
        while not stop.wait(every_s):
            peak[0] = max(peak[0], _status("RssAnon"))

    threading.Thread(target=run, daemon=True).start()
    return peak, stop


def measure(path: str, quantized, dtype: str) -> dict:
    """(run in a subprocess) load one model, report bytes. quantized: False (16-bit), True or
    "while" (finetune's load: experts quantized as they stream in), "after" (transformers' stock
    4-bit load, experts quantized once the whole model is in: the load before streaming)."""
    import time

    import torch

    torch.set_num_threads(1)
    import bitsandbytes  # noqa: F401  (libraries imported before the baseline: their code is not the model)
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral import modeling_mixtral  # noqa: F401

    from finetune.qlora.experts import quantize_experts
    from finetune.qlora.loading import bnb_config, load_quantized
    from finetune.qlora.memory import resident_bytes
    from finetune.modeling import dequantized, load_config, ships_mxfp4
    from finetune.recipe import ModelSection

    baseline, baseline_anon = _status("VmRSS"), _status("RssAnon")
    peak_anon, stop = _anon_peak_sampler()
    start = time.perf_counter()
    # eager attention: gpt-oss refuses sdpa (its sinks), and the attention kernel holds no weights
    section = ModelSection(name_or_path=path, dtype=dtype, attn_implementation="eager")
    if quantized in (True, "while"):
        model = load_quantized(section)
        held = resident_bytes(model)
    elif quantized == "after" and ships_mxfp4(load_config(section)):
        # an MXFP4 checkpoint takes no BitsAndBytesConfig: the stock route decodes it to 16-bit
        # (Mxfp4Config(dequantize=True)) and quantizes the experts afterwards (linear layers stay 16-bit)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                     **dequantized(load_config(section), path))
        quantize_experts(model, getattr(torch, dtype))
        held = resident_bytes(model)
    elif quantized == "after":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), quantization_config=bnb_config(getattr(torch, dtype)))
        quantize_experts(model, getattr(torch, dtype))
        held = resident_bytes(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        held = {"other": sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())}
    seconds = time.perf_counter() - start
    stop.set()
    gc.collect()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed 16-bit buffers back to the OS, so RSS shows what is held
    return {"tensors": held, "rss_after_load": _status("VmRSS") - baseline, "peak_rss": _status("VmHWM"),
            "baseline_rss": baseline, "rss_anon_after_load": _status("RssAnon") - baseline_anon,
            "rss_file_after_load": _status("RssFile"), "peak_rss_anon": max(peak_anon[0], _status("RssAnon")),
            "baseline_rss_anon": baseline_anon, "seconds": seconds}


def params_of(path: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    return {"total": total, "experts": experts, "linear4bit": linear, "other": total - experts - linear}


def make_random_mixtral(out: Path, layers: int = 8, max_shard_size: str = "5GB", **shape) -> Path:
    """A random Mixtral-architecture checkpoint in bfloat16: hidden 1024, 8 experts of 3584, vocab
    32000 (`shape` overrides any MixtralConfig field); 8 layers are ~1.6 GB (0.79B parameters),
    each layer adds 0.18 GB. transformers saves the experts under Mixtral's per-expert keys
    (w1/w2/w3), as the hub checkpoints have them."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
                                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                     max_position_embeddings=4096, tie_word_embeddings=False), **shape})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = MixtralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def make_random_gpt_oss(out: Path, layers: int = 8, max_shard_size: str = "5GB", **shape) -> Path:
    """A random gpt-oss-architecture checkpoint in bfloat16 (a second expert layout: (E, in, out)
    weights, expert biases, interleaved gate/up): hidden 1024, 8 experts of 2048, vocab 32000
    (`shape` overrides any GptOssConfig field); each layer ~0.11 GB. Saved in 16-bit, not MXFP4."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**{**dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=8,
                                    num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=128,
                                    layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2),
                                    tie_word_embeddings=False), **shape})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = GptOssForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # gpt-oss leaves its fused experts as torch.empty until loading: give them values
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(std=0.02)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def make_random_gpt_oss_mxfp4(out: Path, layers: int = 8, max_shard_size: str = "5GB", **shape) -> Path:
    """make_random_gpt_oss with its experts then rewritten in MXFP4, as the released gpt-oss ships them
    (random codes; bench/mxfp4_checkpoint.py)."""
    import mxfp4_checkpoint

    make_random_gpt_oss(out, layers, max_shard_size, **shape)
    mxfp4_checkpoint.to_mxfp4(out, keep_expected=False)
    return out


RANDOM = {"mixtral": make_random_mixtral, "gpt_oss": make_random_gpt_oss, "gpt_oss_mxfp4": make_random_gpt_oss_mxfp4}


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A memory cgroup whose processes may hold at most `limit` bytes, page cache included: the
    kernel drops clean file pages (the mmap-ed checkpoint) to stay under it, and OOM-kills a
    process whose own memory would not fit. cgroup v2 or v1, whichever this machine lets us write."""
    name = f"qlora-memory-{os.getpid()}"
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.subtree_control").read_text():
        group, limit_file, peak_file = v2 / name, "memory.max", "memory.peak"
    elif (v1 / "memory.limit_in_bytes").is_file():
        group, limit_file, peak_file = v1 / name, "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    else:
        raise SystemExit("--bounded-load needs a writable memory cgroup (v1 or v2) to impose the limit")
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError as exc:
        raise SystemExit(f"--bounded-load needs a writable memory cgroup (v1 or v2): {exc}") from None
    try:
        yield group, lambda: int((group / peak_file).read_text())
    finally:
        group.rmdir()


def bounded_load(layers: int, limit_share: float, shard: str, family: str = "mixtral") -> None:
    """Load a random checkpoint of `family`'s architecture (RANDOM) in 4-bit two ways, free and under a memory
    limit of `limit_share` of the checkpoint's size: finetune's load (experts quantized as they
    stream in) and the stock load (quantized after the whole model is in)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = RANDOM[family](Path(tmp) / f"random-{family}", layers=layers, max_shard_size=shard)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        n = params_of(str(path))
        limit = int(limit_share * size)
        print(f"checkpoint: random {family}, {layers} layers, {n['total'] / 1e9:.2f}B parameters, {size / GiB:.2f} GiB bfloat16{' (experts in MXFP4)' if family.endswith('mxfp4') else ''} in "
              f"{len(list(path.glob('*.safetensors')))} shards; limit {limit / GiB:.2f} GiB ({limit_share:.0%})", flush=True)
        for mode, what in (("while", "experts quantized while loading (finetune)"),
                           ("after", "experts quantized after loading (stock 4-bit load)")):
            free = in_subprocess(str(path), mode, "bfloat16")
            with memory_cgroup(limit) as (group, peak):
                capped = in_subprocess(str(path), mode, "bfloat16", cgroup=group)
                capped_peak = peak()
            row = {"mode": what, "seconds": round(free["seconds"], 1),
                   "peak_rss_GiB (VmHWM, with file pages)": round(free["peak_rss"] / GiB, 3),
                   "peak_anonymous_rss_GiB (sampled every 2 ms)": round(free["peak_rss_anon"] / GiB, 3),
                   "process_baseline_anonymous_GiB": round(free["baseline_rss_anon"] / GiB, 3),
                   "4bit_tensor_GiB": round(sum(free["tensors"].values()) / GiB, 3),
                   f"under the {limit / GiB:.2f} GiB limit": "killed by the OOM killer" if capped["killed"] else "loaded",
                   "cgroup peak usage GiB": round(capped_peak / GiB, 3)}
            print(json.dumps(row, indent=1), flush=True)


def in_subprocess(path: str, quantized, dtype: str, cgroup: Path | None = None) -> dict:
    """measure() in a fresh process; inside `cgroup` (a memory cgroup with a limit) if given.
    Returns {"killed": True, ...} when the kernel's OOM killer ends it there."""
    code = (f"import json,sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import qlora_memory as q; "
            f"print('RESULT', json.dumps(q.measure({path!r}, {quantized!r}, {dtype!r})))")
    join = None if cgroup is None else (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=join)
    if cgroup is not None and out.returncode == -9:
        return {"killed": True}
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({out.returncode}):\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return {"killed": False, **json.loads(line[len("RESULT "):])}


def report(name: str, path: str, dtype: str) -> dict:
    n = params_of(path)
    full = in_subprocess(path, False, dtype)
    quant = in_subprocess(path, True, dtype)
    t = quant["tensors"]
    row = {
        "model": name, "params": n, "dtype": dtype,
        "16bit_tensor_bytes_per_param": full["tensors"]["other"] / n["total"],
        "4bit_tensor_bytes_per_param": sum(t.values()) / n["total"],
        "nf4_experts_bytes_per_expert_param": t["nf4_experts"] / n["experts"],
        "linear4bit_bytes_per_param": t["linear4bit"] / n["linear4bit"],
        "other_bytes": t["other"],
        "16bit_rss_after_load_per_param": full["rss_after_load"] / n["total"],
        "4bit_rss_after_load_per_param": quant["rss_after_load"] / n["total"],
        "16bit_anonymous_rss_after_load_per_param": full["rss_anon_after_load"] / n["total"],
        "4bit_anonymous_rss_after_load_per_param": quant["rss_anon_after_load"] / n["total"],
        "16bit_file_backed_rss_GiB": full["rss_file_after_load"] / GiB,
        "4bit_file_backed_rss_GiB": quant["rss_file_after_load"] / GiB,
        "16bit_peak_rss_GiB": full["peak_rss"] / GiB, "4bit_peak_rss_GiB": quant["peak_rss"] / GiB,
        "process_baseline_rss_GiB": quant["baseline_rss"] / GiB,
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def mixtral_8x7b(b4: float, tokens: int = 4096) -> list[tuple[str, float]]:
    """Training memory of Mixtral-8x7B in QLoRA on one GPU, in GB (1e9), from b4 = measured bytes per 4-bit param."""
    layers, hidden, inter, experts, kv, vocab, r = 32, 4096, 14336, 8, 1024, 32000, 16
    expert_params = layers * experts * 3 * hidden * inter
    attn_params = layers * (2 * hidden * hidden + 2 * hidden * kv)
    other = 2 * vocab * hidden + layers * experts * hidden + (2 * layers + 1) * hidden  # embed, lm_head, router, norms
    lora = layers * (r * (hidden + hidden) * 2 + r * (hidden + kv) * 2
                     + experts * (r * (hidden + 2 * inter) + r * (inter + hidden)))
    bf16 = 2
    # activations, bf16, gradient checkpointing per decoder layer: each layer's input is kept; the
    # layer being recomputed in backward holds its own intermediates (attention q/k/v/out, routed
    # MoE rows at top-2: gathered x, gate_up out, activation, down out, and their gradients ~2x)
    checkpoints = layers * tokens * hidden * bf16
    routed = 2 * tokens
    one_layer = (tokens * (hidden + 2 * kv + hidden) * bf16 + routed * (hidden + 2 * inter + inter + hidden) * bf16) * 2
    dequantized_expert = 2 * (2 * inter * hidden) * bf16  # one expert's gate_up, forward copy + backward copy
    logits = tokens * vocab * 4 * 3  # fp32 logits, log-softmax and their gradient
    rows = [
        ("weights: experts + attention in NF4 (measured bytes/param)", (expert_params + attn_params) * b4),
        ("weights: embeddings, lm_head, router, norms in bf16", other * bf16),
        ("LoRA r=16 attention+experts, fp32 master weights", lora * 4),
        ("LoRA gradients fp32", lora * 4),
        ("AdamW state fp32 (2 per param)", lora * 8),
        (f"activations at {tokens} tokens, checkpointed layer inputs", checkpoints),
        ("activations: the one layer recomputed in backward", one_layer),
        ("one dequantized expert matrix (forward and backward)", dequantized_expert),
        ("logits fp32 + log-softmax + grad", logits),
    ]
    return [(k, v / 1e9) for k, v in rows] + [("parameters (billions)", (expert_params + attn_params + other) / 1e9),
                                              ("LoRA parameters (millions)", lora / 1e9 * 1e3)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only-tiny", action="store_true")
    ap.add_argument("--bounded-load", action="store_true", help="peak memory of the 4-bit load, free and under a memory cgroup limit")
    ap.add_argument("--layers", type=int, default=24, help="--bounded-load: decoder layers of the random checkpoint")
    ap.add_argument("--limit-share", type=float, default=0.5, help="--bounded-load: the limit, as a share of the checkpoint size")
    ap.add_argument("--shard", default="200MB", help="--bounded-load: checkpoint shard size")
    ap.add_argument("--family", default="mixtral", choices=sorted(RANDOM), help="--bounded-load: the random checkpoint's architecture")
    args = ap.parse_args()
    if args.bounded_load:
        bounded_load(args.layers, args.limit_share, args.shard, args.family)
        return
    rows = [report("model/tiny-moe", str(REPO / "model" / "tiny-moe"), "float32")]
    if not args.only_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_random_mixtral(Path(tmp) / "random-mixtral")
            rows.append(report("random Mixtral 0.77B (bf16 checkpoint)", str(path), "bfloat16"))
    last = rows[-1]  # the largest model measured: bytes per 4-bit parameter, experts and linear layers together
    n = last["params"]
    b4 = ((last["nf4_experts_bytes_per_expert_param"] * n["experts"] + last["linear4bit_bytes_per_param"] * n["linear4bit"])
          / (n["experts"] + n["linear4bit"]))
    print(f"\nMixtral-8x7B QLoRA on one GPU, computed from {b4:.4f} bytes per 4-bit parameter (measured above):")
    est = mixtral_8x7b(b4)
    total = sum(v for k, v in est if not k.startswith(("parameters", "LoRA parameters")))
    for k, v in est:
        print(f"  {k:<62} {v:8.2f}")
    print(f"  {'total (GB)':<62} {total:8.2f}   fits 48 GB: {total < 48}  (plus CUDA context/allocator slack)")


if __name__ == "__main__":
    main()
