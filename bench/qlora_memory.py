"""Resident memory of a 4-bit (QLoRA) Mixtral-architecture model, measured, and what that means for Mixtral-8x7B.

    python bench/qlora_memory.py                 # model/tiny-moe and a random ~1.5 GB Mixtral-shaped model
    python bench/qlora_memory.py --only-tiny

Each load runs in a fresh subprocess so its peak RSS (VmHWM) is its own: the 16-bit model as
transformers loads it, and the same checkpoint through finetune.qlora.load_quantized. Reported
per model: the tensors' byte counts by kind (NF4 experts with their quantization state,
bitsandbytes Linear4bit with theirs, everything else in 16/32-bit), RSS after the load (VmRSS,
after gc and malloc_trim; also split into anonymous memory and file-backed pages, which are
the mmap-ed safetensors) and the peak (VmHWM), per parameter of the original model. From the measured bytes
per 4-bit parameter it then computes Mixtral-8x7B's training memory on one GPU: weights + LoRA
(attention and experts, r=16) + AdamW state + activations at 4k tokens with gradient
checkpointing (a computed estimate, not a GPU measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
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


def measure(path: str, quantized: bool, dtype: str) -> dict:
    """(run in a subprocess) load one model, report bytes."""
    import torch

    torch.set_num_threads(1)
    import bitsandbytes  # noqa: F401  (libraries imported before the baseline: their code is not the model)
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral import modeling_mixtral  # noqa: F401

    from finetune import qlora
    from finetune.recipe import ModelSection

    baseline, baseline_anon = _status("VmRSS"), _status("RssAnon")
    section = ModelSection(name_or_path=path, dtype=dtype)
    if quantized:
        model = qlora.load_quantized(section)
        held = qlora.resident_bytes(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        held = {"other": sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())}
    gc.collect()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed 16-bit buffers back to the OS, so RSS shows what is held
    return {"tensors": held, "rss_after_load": _status("VmRSS") - baseline, "peak_rss": _status("VmHWM"),
            "baseline_rss": baseline, "rss_anon_after_load": _status("RssAnon") - baseline_anon,
            "rss_file_after_load": _status("RssFile")}


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


def make_random_mixtral(out: Path) -> Path:
    """A random Mixtral-architecture checkpoint of ~1.5 GB in bfloat16 (0.77B parameters)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = MixtralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    return out


def in_subprocess(path: str, quantized: bool, dtype: str) -> dict:
    code = (f"import json,sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import qlora_memory as q; "
            f"print('RESULT', json.dumps(q.measure({path!r}, {quantized}, {dtype!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


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
    args = ap.parse_args()
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
