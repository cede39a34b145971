"""4-bit experts beyond Mixtral's layout, on a tiny random gpt-oss: (E, in, out) weights, expert
biases, interleaved and clamped SwiGLU. The 4-bit fast path equals PEFT's stock path on a 16-bit
copy holding the dequantized weights (float32, rtol 1e-4, atol 1e-5 x the largest magnitude); the
biases stay 16-bit parameters; the streamed load quantizes every fused weight as it is read.

    pytest tests/unit/qlora/test_nf4_layouts.py      # CPU, offline, a few seconds
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_lora
from transformers import AutoModelForCausalLM

from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.qlora import experts as nf4_experts
from finetune.qlora import loading as qlora_loading
from finetune.qlora import nf4

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import tiny_configs  # the support matrix's tiny config of each family

WEIGHTS = ("gate_up_proj", "down_proj")
BIASES = ("gate_up_proj_bias", "down_proj_bias")


def tiny_gpt_oss(seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs.tiny_config("gpt_oss")).float().eval()
    with torch.no_grad():  # biases and sinks start at zero: make them matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def lora(model):
    return random_lora(model, WEIGHTS)


def run(model, ids):
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return {"logits": logits.detach(), "input grad": emb.grad} | {
        n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gpt_oss_4bit_fast_path_matches_dequantized_reference():
    base = tiny_gpt_oss()
    quant, ref = copy.deepcopy(base), copy.deepcopy(base)
    assert nf4_experts.quantize_experts(quant, torch.float32) == 2
    for lq, lr, lb in zip(quant.model.layers, ref.model.layers, base.model.layers):
        eq = lq.mlp.experts
        assert nf4_experts.is_nf4(eq) and eq.is_transposed
        for w in WEIGHTS:
            deq = nf4.dequantized_weight(eq, w)
            orig = getattr(lb.mlp.experts, w)
            assert deq.shape == orig.shape == getattr(eq, w).shape  # the placeholder keeps (E, in, out)
            assert (deq - orig).abs().mean() < 0.1 * orig.abs().mean()
            getattr(lr.mlp.experts, w).data.copy_(deq)
        for b in BIASES:  # biases stay 16-bit parameters, untouched
            assert isinstance(getattr(eq, b), torch.nn.Parameter) and torch.equal(getattr(eq, b), getattr(lb.mlp.experts, b))
    quant, ref = lora(quant), lora(ref)
    assert enable_fast_expert_lora(quant) == 2
    ids = torch.randint(0, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want = run(quant, ids), run(ref, ids)
    assert got.keys() == want.keys() and any("experts" in k for k in got)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()),
                                   msg=lambda m, key=key: f"{key}: {m}")
        assert got[key].abs().sum() > 0, key


def test_gpt_oss_streamed_4bit_load(tmp_path, monkeypatch, caplog):
    """Every fused expert weight of a gpt-oss checkpoint is quantized as transformers reads it (none
    left to quantize afterwards), to the same bytes as quantizing the loaded 16-bit model; biases load
    as 16-bit parameters equal to the checkpoint's."""
    from finetune.recipe import ModelSection

    base = tiny_gpt_oss()
    base.save_pretrained(tmp_path / "m")
    arrived = []
    real = nf4_experts.quantize_expert_weight

    def spy(experts, name, w, compute_dtype, staged=False):
        arrived.append((name, tuple(w.shape)))
        return real(experts, name, w, compute_dtype, staged)

    monkeypatch.setattr(qlora_loading, "quantize_expert_weight", spy)
    with caplog.at_level("WARNING", logger="finetune"):
        model = qlora_loading.load_quantized(ModelSection(name_or_path=str(tmp_path / "m"), dtype="float32",
                                                                attn_implementation="eager"))
    monkeypatch.setattr(qlora_loading, "quantize_expert_weight", real)
    experts0 = base.model.layers[0].mlp.experts
    assert sorted(arrived) == sorted([(w, tuple(getattr(experts0, w).shape)) for w in WEIGHTS] * 2)
    assert "after loading" not in caplog.text
    after = copy.deepcopy(base)
    nf4_experts.quantize_experts(after, torch.float32)
    for got, want, orig in zip(model.model.layers, after.model.layers, base.model.layers):
        assert nf4_experts.is_nf4(got.mlp.experts)
        for w in WEIGHTS:
            assert torch.equal(nf4.dequantized_weight(got.mlp.experts, w), nf4.dequantized_weight(want.mlp.experts, w))
        for b in BIASES:
            assert getattr(got.mlp.experts, b).dtype == torch.float32
            assert torch.equal(getattr(got.mlp.experts, b), getattr(orig.mlp.experts, b))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():  # a bare 4-bit base runs (the DPO reference with adapters off takes this path)
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_unserved_experts_refused_before_loading(tmp_path):
    """Llama-4's text experts are not a transformers experts-dispatch module: the fast path, the only
    one 4-bit experts run on, cannot serve them, so the 4-bit load says so before reading any weight."""
    import support_matrix  # the family sweep's recipe and tiny checkpoints (bench modules)
    import tiny_models
    import yaml

    from finetune.errors import UserError
    from finetune.recipe import ModelSection, read_recipe
    from finetune.validate import check

    path, _ = tiny_models.tiny_checkpoint("llama4_text", tmp_path / "m")
    with pytest.raises(UserError, match=r"model.quantization: .*Llama4TextExperts is not a transformers") as err:
        qlora_loading.load_quantized(ModelSection(name_or_path=str(path), dtype="float32"))
    assert [p.where for p in err.value.problems] == ["model.quantization"]
    recipe = support_matrix.recipe(tmp_path, path, "sft")
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "model": {
        "name_or_path": str(path), "dtype": "float32", "quantization": "nf4"}}))
    with pytest.raises(UserError) as err:  # finetune validate says it too, before any weight is read
        check(read_recipe(recipe))
    assert any(p.where == "model.quantization" and "Llama4TextExperts" in p.what for p in err.value.problems)
