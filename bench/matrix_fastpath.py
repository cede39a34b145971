"""Two columns of the MoE support matrix (bench/support_matrix.py), per model type, on its tiny checkpoint:

- "fast path": LoRA on every fused experts weight, one forward and backward on PEFT's stock path and
  one on the fast expert path (finetune/lora/fast_experts.py): logits and every gradient equal
  (float32, rtol 1e-4, atol 1e-5 x the largest magnitude), or the reason the fast path names for
  leaving a module stock;
- "4-bit load quantizes the experts": finetune's 4-bit load (finetune/qlora/loading.py) leaves every
  MoE layer's experts in NF4, quantized as the checkpoint streams in (not after the load).

    python bench/support_matrix.py --types gpt_oss mixtral --out /tmp/m.md     # runs these with the rest
"""

from __future__ import annotations

import logging
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.moe import expert_weight_names, experts_modules
from finetune.recipe import ModelSection

COLUMNS = ["fast path", "4-bit load quantizes the experts"]
IDS = torch.tensor([[1, 9, 4, 17, 22, 30, 5, 2, 40, 41, 42, 43]])


def _step(model) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=IDS).logits
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return {"logits": logits.detach()} | {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def fast_path(model_dir) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    names = sorted({f"{n}.{w}" for n, m in model.named_modules() if m in experts_modules(model) for w in expert_weight_names(m)})
    modules = len(experts_modules(model))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_parameters=names))
    with torch.no_grad():  # PEFT inits B to zero, which would hide any error in the B·A product
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    stock = _step(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast_modules = enable_fast_expert_lora(model)
        fast = _step(model)
    reasons = sorted({str(w.message).removeprefix("fast expert LoRA: ").removesuffix("; using PEFT's stock path for it")
                      for w in caught if "fast expert LoRA" in str(w.message)})
    if fast_modules < modules:
        return f"stock path ({modules - fast_modules} of {modules} MoE layers): " + "; ".join(reasons)
    worst = 0.0
    for key, want in stock.items():
        atol = 1e-5 * max(1.0, want.abs().max().item())
        if not torch.allclose(fast[key], want, rtol=1e-4, atol=atol):
            return f"fast path differs from stock in {key} by {(fast[key] - want).abs().max().item():.2e}"
        worst = max(worst, ((fast[key] - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
    return f"pass ({modules} MoE layers; fast = stock in logits and {len(stock) - 1} gradients, max diff {worst:.1e} relative)"


def four_bit(model_dir) -> str:
    from finetune.qlora.experts import is_nf4  # bitsandbytes: an optional extra
    from finetune.qlora.loading import load_quantized

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("finetune")
    log.addHandler(handler)
    try:
        model = load_quantized(ModelSection(name_or_path=str(model_dir), dtype="float32", attn_implementation="eager"))
    finally:
        log.removeHandler(handler)
    late = [r.getMessage() for r in records if "after loading" in r.getMessage()]
    mods = experts_modules(model)
    if not mods or not all(is_nf4(m) for m in mods):
        return f"{sum(is_nf4(m) for m in mods)} of {len(mods)} MoE layers' experts in NF4"
    if late:
        return late[0]
    return f"pass ({len(mods)} MoE layers in NF4, quantized while loading)"


def cells(model_dir) -> dict[str, str]:
    """Both columns; a crash is the cell's text, as in the rest of the matrix."""
    out = {}
    for column, fn in zip(COLUMNS, (fast_path, four_bit)):
        try:
            out[column] = fn(model_dir)
        except Exception as exc:  # noqa: BLE001  # the matrix records any crash as the cell's reason
            problems = getattr(exc, "problems", None)
            text = "; ".join(map(str, problems)) if problems else (str(exc).splitlines()[0] if str(exc) else "")
            out[column] = f"{type(exc).__name__}: {text[:300]}"
    return out


def refill(model_type: str, tmp, row: list[str] | None, all_columns: list[str]) -> dict[str, str]:
    """`support_matrix.py --only-fastpath`: a row's cells with only these two columns run again (they
    were added after issue 19's full sweep); the row's other cells are kept as they were."""
    import tiny_configs  # bench modules, beside this one
    import tiny_models

    base = all_columns[: -len(COLUMNS)]
    kept = dict(zip(["_note", *base], row)) if row else {c: "not run" for c in base}
    built, how = tiny_configs.text_model_type(model_type)
    if built is None:
        return kept | {c: how for c in COLUMNS}
    model_dir, _ = tiny_models.tiny_checkpoint(built, tmp / "base")
    return kept | cells(model_dir)
