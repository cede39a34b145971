"""Part `qlora`: the one-GPU QLoRA case, 32 Mixtral-8x7B-shaped layers with 4-bit experts and LoRA:
training-step tokens/s and peak memory, next to the memory bench/qlora_memory.py predicts.

    python bench/gpu_kit/kit.py qlora --out DIR [--dry-run]      # writes DIR/qlora.json

The model is Mixtral-8x7B's architecture with random weights (32 layers, hidden 4096,
intermediate 14336, 8 experts top-2, 32/8 heads, vocab 32000), built on the GPU one decoder
layer at a time and quantized as it is built, as finetune's 4-bit load does (finetune/qlora):
experts NF4 per expert (qlora.quantize_experts_module), q/k/v/o bitsandbytes Linear4bit (NF4,
double quantization), the rest bf16; so the 16-bit working set is one layer (a 93 GB bf16 model
never exists). LoRA r=16 on attention and experts, fast expert path, gradient checkpointing per
layer, AdamW, 1 x 4096 tokens a step (the sequence bench/qlora_memory.py's prediction is for).
"""

from __future__ import annotations

import gc

import torch

from gpu_kit.common import (
    H100_BF16_DENSE_TFLOPS,
    Part,
    load_bench_script,
    summary,
    time_steps,
)
from gpu_kit.layers import sft_step

FULL = dict(layers=32, hidden=4096, intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, vocab=32000,
            batch=1, seq=4096, rank=16, steps=3, warmup=1)
DRY = dict(layers=2, hidden=64, intermediate=128, experts=4, top_k=2, heads=4, kv_heads=2, vocab=128,
           batch=1, seq=32, rank=8, steps=2, warmup=1)
MIXTRAL_8X7B = {k: FULL[k] for k in ("layers", "hidden", "intermediate", "experts", "kv_heads", "vocab", "rank")}


def _random_(module, gen) -> None:
    """Fresh random values for every parameter (norms at 1): new layers come from torch.empty."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, device=p.device, generator=gen, dtype=torch.float32).mul_(0.02))


def _linear4bit(linear, dtype):
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
                            compress_statistics=True, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
    return new.to(linear.weight.device)  # Params4bit quantizes on its first move to a device


def quantize_layer(layer, dtype) -> None:
    from finetune.qlora.experts import quantize_experts_module

    quantize_experts_module(layer.mlp.experts, dtype)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(layer.self_attn, name, _linear4bit(getattr(layer.self_attn, name), dtype))


def build(s: dict, device: str, dtype=torch.bfloat16):
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

    config = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                           num_hidden_layers=1, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                           num_local_experts=s["experts"], num_experts_per_tok=s["top_k"],
                           max_position_embeddings=max(s["seq"], 128), router_aux_loss_coef=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = MixtralForCausalLM._from_config(config, dtype=dtype)  # embeddings, head, norms and layer 0, initialised
    gen = torch.Generator(device=device).manual_seed(0)
    quantize_layer(model.model.layers[0], dtype)
    default = torch.get_default_dtype()
    for i in range(1, s["layers"]):
        torch.set_default_dtype(dtype)  # the new layer is born in 16-bit on the device: no float32 copy
        try:
            with torch.device(device):
                layer = MixtralDecoderLayer(model.config, layer_idx=i)
        finally:
            torch.set_default_dtype(default)
        _random_(layer, gen)
        quantize_layer(layer, dtype)
        model.model.layers.append(layer)
    model.config.num_hidden_layers = s["layers"]
    model.is_loaded_in_4bit = True  # what transformers' 4-bit load sets; PEFT then wraps Linear4bit with its 4-bit LoRA
    return model


def prediction(resident: dict, params_4bit: int, s: dict) -> dict:
    """bench/qlora_memory.py's computed Mixtral-8x7B QLoRA memory, from this model's bytes per 4-bit parameter."""
    if {k: s[k] for k in MIXTRAL_8X7B} != MIXTRAL_8X7B:
        return {"total_gb": None, "note": "the prediction is for Mixtral-8x7B's shapes only"}
    qm = load_bench_script("qlora_memory")
    b4 = (resident["nf4_experts"] + resident["linear4bit"]) / params_4bit
    rows = qm.mixtral_8x7b(b4, tokens=s["batch"] * s["seq"])
    total = sum(v for k, v in rows if not k.startswith(("parameters", "LoRA parameters")))
    return {"bytes_per_4bit_param": b4, "rows_gb": dict(rows), "total_gb": total, "total_gib": total * 1e9 / 2**30,
            "source": "bench/qlora_memory.py mixtral_8x7b (computed)"}


def run(out, dry_run: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    from finetune.lora.fast_experts import enable_fast_expert_lora
    from finetune.moe import experts_modules
    from finetune.qlora.memory import resident_bytes
    from finetune.qlora.nf4 import require_bitsandbytes

    el = load_bench_script("expert_lora")
    part = Part("qlora", out, dry_run)
    cuda = torch.cuda.is_available() and not dry_run
    device, s = ("cuda" if cuda else "cpu"), (DRY if dry_run else FULL)
    if not cuda:
        torch.set_num_threads(1)
        part.skip("CUDA timings and peak memory", "no CUDA: tiny shapes on the CPU (peak RSS), not a GPU figure")
    part.data.update(shapes=s, device=device, gradient_checkpointing=True, peak_tflops=H100_BF16_DENSE_TFLOPS,
                     plan_predicted_gib=None, plan_note="`finetune plan` does not exist in this tree")
    try:
        require_bitsandbytes("the qlora part")
    except Exception as exc:  # noqa: BLE001  (UserError: not installed; the report shows the part as skipped)
        part.skip("qlora benchmark", str(exc))
        part.error = str(exc)
        part.write("skipped")
        return part.data
    el.reset_peak(device)
    import time

    t0 = time.perf_counter()
    model = build(s, device)
    part.data["build_s"] = time.perf_counter() - t0
    part.data["build_peak_gib"] = el.peak_gib(device)
    resident = resident_bytes(model)
    n4 = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear4bit")  # packed: 2 per byte
    n4 = 2 * n4 + sum(getattr(m, k).numel() for m in experts_modules(model) for k in ("gate_up_proj", "down_proj"))
    part.data.update(resident_gib={k: v / 2**30 for k, v in resident.items()}, params_4bit=n4,
                     predicted=prediction(resident, n4, s))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=2 * s["rank"], target_modules=el.ATTENTION,
                                             target_parameters=el.EXPERTS))
    part.data["fast_layers"] = enable_fast_expert_lora(model)
    part.data["lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device, generator=torch.Generator(device=device).manual_seed(1))
    losses = []
    gc.collect()
    el.reset_peak(device)
    try:
        times = time_steps(lambda: losses.append(sft_step(model, opt, ids)), device, s["warmup"], s["steps"])
    except torch.OutOfMemoryError as exc:
        part.error = f"OOM: {exc}"
        part.write("failed")
        return part.data
    tokens = s["batch"] * s["seq"]
    st = summary(times)
    flops = tokens * el.flops_per_token(model.get_base_model().config, s["seq"], True)
    loss = [float(x) for x in losses]
    part.data.update(tokens_per_step=tokens, **st, tokens_per_s=tokens / st["step_s_median"], flops_per_step=flops,
                     mfu=flops / st["step_s_median"] / (H100_BF16_DENSE_TFLOPS * 1e12), peak_gib=el.peak_gib(device),
                     reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                     losses=loss, fits_48gb=None if not cuda else el.peak_gib(device) * 2**30 <= 48e9)
    pred = part.data["predicted"].get("total_gib")
    print(f"qlora: {s['layers']} layers 4-bit, {tokens} tokens/step: {part.data['tokens_per_s']:.0f} tok/s, "
          f"peak {part.data['peak_gib']:.2f} GiB (predicted {pred if pred is None else f'{pred:.2f}'} GiB), "
          f"build {part.data['build_s']:.0f} s", flush=True)
    finite = all(x == x and abs(x) < 1e30 for x in loss)
    part.error = None if finite and part.data["fast_layers"] == s["layers"] else \
        f"losses {loss}, fast path on {part.data['fast_layers']} of {s['layers']} layers"
    part.write("ok" if part.error is None else "failed")
    return part.data
