"""finetune/qlora/__init__.py: NF4 experts dequantize within NF4's error, and the 4-bit fast path equals a
reference built from the dequantized weights (PEFT's stock path on 16-bit copies), forward and back.

Run: `pytest tests/unit/qlora/test_nf4_experts.py` (CPU, offline, a few seconds).
"""

from __future__ import annotations

import copy

import pytest
import torch
from bitsandbytes.functional import dequantize_blockwise
from conftest import random_lora, recipe_file, sft_recipe
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import MixtralConfig, MixtralForCausalLM

from finetune.errors import UserError
from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.qlora import experts as nf4_experts
from finetune.qlora import loading as qlora_loading
from finetune.qlora import nf4
from finetune.recipe import read_recipe
from finetune.validate import check

E, H, I = 4, 64, 96  # experts, hidden, intermediate (H·I a multiple of the 64-element block)


def tiny(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def lora(model):
    return random_lora(model)


def test_experts_dequantize_within_nf4_error():
    """Per 64-element block: |w - deq| <= half the widest gap of the NF4 code x absmax, plus the
    double-quantized absmax's own error; and the placeholder holds no storage."""
    base = tiny()
    w = base.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    experts = base.model.layers[0].mlp.experts
    nf4_experts.quantize_experts_module(experts, torch.float32)
    deq = nf4.dequantized_weight(experts, "gate_up_proj")
    code = experts.nf4_code.sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    blocks = w.reshape(E, -1, nf4.BLOCKSIZE)
    absmax = blocks.abs().amax(-1)
    # the absmax bitsandbytes stores: 8-bit blockwise with an offset (double quantization)
    from bitsandbytes.functional import QuantState

    stored = torch.stack([
        dequantize_blockwise(experts.gate_up_proj_nf4_absmax[e],
                             QuantState(absmax=experts.gate_up_proj_nf4_absmax2[e], code=experts.nf4_absmax_code,
                                        blocksize=experts.nf4["weights"]["gate_up_proj"]["nested_blocksize"],
                                        dtype=torch.float32)) + experts.gate_up_proj_nf4_offset[e]
        for e in range(E)])
    err = (deq.reshape(blocks.shape) - blocks).abs().amax(-1)
    bound = half_gap * absmax + (stored - absmax).abs() + 1e-6
    assert (err <= bound).all()
    assert (stored - absmax).abs().max() <= 0.01 * absmax.max()  # double quantization costs ~1% of absmax
    assert (deq - w).abs().mean() < 0.1 * w.abs().mean()
    assert experts.gate_up_proj.shape == w.shape and experts.gate_up_proj.untyped_storage().nbytes() == 4
    assert experts.gate_up_proj_nf4_packed.dtype == torch.uint8
    assert experts.gate_up_proj_nf4_packed.numel() == w.numel() // 2


def pair():
    """(4-bit-expert PEFT model on the fast path, 16-bit PEFT model with the dequantized weights
    on PEFT's stock path): the same LoRA factors, the reference shares nothing with qlora's GEMMs."""
    base = tiny()
    quant = copy.deepcopy(base)
    nf4_experts.quantize_experts(quant, torch.float32)
    ref = copy.deepcopy(base)
    for mq, mr in zip(quant.model.layers, ref.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            getattr(mr.mlp.experts, name).data.copy_(nf4.dequantized_weight(mq.mlp.experts, name))
    quant, ref = lora(quant), lora(ref)
    assert enable_fast_expert_lora(quant) == 2
    return quant, ref


def run(model, ids):
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * probe).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), emb.grad, grads


def close(a, b, what):
    # fp32, the same weights, sums in another order: atol relative to the tensor's scale
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=lambda m: f"{what}: {m}")


def test_fast_path_matches_dequantized_reference():
    quant, ref = pair()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    lq, eq, gq = run(quant, ids)
    lr, er, gr = run(ref, ids)
    close(lq, lr, "logits")
    close(eq, er, "input-embedding grad")
    assert gq.keys() == gr.keys() and any("experts" in n for n in gq)
    for name in gq:
        close(gq[name], gr[name], name)
        assert gq[name].abs().sum() > 0, name


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.stride() != (0,) * t.ndim:
                self.largest = max(self.largest, t.numel())
        return out


def test_working_set_is_one_expert():
    """Forward and backward never build a floating tensor of more than one expert's matrix."""
    quant, _ = pair()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    experts = quant.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    emb = quant.get_input_embeddings()(ids).detach().requires_grad_(True)
    with _Largest() as mode:
        quant(inputs_embeds=emb).logits.sum().backward()
    one_expert = 2 * I * H
    assert one_expert <= mode.largest < E * one_expert // 2  # the vocab-sized logits are smaller still
    assert emb.grad is not None and experts.gate_up_proj.grad is None


def test_stock_path_refused_at_runtime():
    base = tiny()
    nf4_experts.quantize_experts(base, torch.float32)
    model = lora(base)  # no enable_fast_expert_lora: PEFT's stock path would add BA to a placeholder
    with pytest.raises(RuntimeError, match="stock expert path"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with model.disable_adapter():  # adapters off: the experts module runs its own 4-bit forward
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def nf4_recipe(tmp_path, tiny_mixtral, sft_file, quantization="nf4", **extra):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, **extra)
    recipe["model"]["quantization"] = quantization
    return recipe


def test_recipe_checks(tmp_path, tiny_mixtral, sft_file, monkeypatch):
    ok = nf4_recipe(tmp_path, tiny_mixtral, sft_file)
    assert check(read_recipe(recipe_file(tmp_path, **ok))).recipe.model.quantization == "nf4"
    bad = nf4_recipe(tmp_path, tiny_mixtral, sft_file, lora={"expert_path": "peft"}, router={"policy": "train"})
    with pytest.raises(UserError) as err:
        check(read_recipe(recipe_file(tmp_path, **bad)))
    wheres = {p.where for p in err.value.problems}
    assert {"lora.expert_path", "router.policy"} <= wheres
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="fsdp2 sharding is not implemented"):
        check(read_recipe(recipe_file(tmp_path, **ok)))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    typo = nf4_recipe(tmp_path, tiny_mixtral, sft_file, quantization="nf44")
    with pytest.raises(UserError, match="nf4"):
        check(read_recipe(recipe_file(tmp_path, **typo)))


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"pip install 'finetune\[qlora\]'"):
        nf4.require_bitsandbytes()


def test_experts_quantized_while_loading(tmp_path, monkeypatch, caplog):
    """load_quantized quantizes each fused expert weight as transformers reads it (checkpoint in
    Mixtral's per-expert w1/w2/w3 keys, merged by transformers' conversion): when the next one
    arrives, the previous 16-bit tensor is gone, nothing is left to quantize after the load, and
    the packed bytes equal those of quantizing the loaded 16-bit model afterwards."""
    import gc
    import weakref

    from safetensors import safe_open

    from finetune.qlora.loading import load_quantized
    from finetune.recipe import ModelSection

    tiny().save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.0.w1.weight" in f.keys() or "model.layers.0.block_sparse_moe.experts.0.w1.weight" in f.keys()
    seen, alive_at_arrival = [], []
    real = nf4_experts.quantize_expert_weight

    def spy(experts, name, w, compute_dtype, staged=False):
        gc.collect()
        alive_at_arrival.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(w))
        assert w.dtype == torch.float32 and w.device.type == "cpu" and w.ndim == 3
        assert staged
        return real(experts, name, w, compute_dtype, staged)

    monkeypatch.setattr(qlora_loading, "quantize_expert_weight", spy)
    with caplog.at_level("INFO", logger="finetune"):
        model = load_quantized(ModelSection(name_or_path=str(tmp_path / "m"), dtype="float32"))
    assert len(seen) == 2 * 2  # two layers x (gate_up_proj, down_proj), every one while loading
    assert alive_at_arrival == [0, 0, 0, 0]
    assert "after loading" not in caplog.text
    monkeypatch.setattr(qlora_loading, "quantize_expert_weight", real)
    after = MixtralForCausalLM.from_pretrained(tmp_path / "m")
    nf4_experts.quantize_experts(after, torch.float32)
    for got, want in zip(model.model.layers, after.model.layers):
        assert nf4_experts.is_nf4(got.mlp.experts)
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(nf4.dequantized_weight(got.mlp.experts, name), nf4.dequantized_weight(want.mlp.experts, name))
            assert torch.equal(getattr(got.mlp.experts, f"{name}_nf4_packed"), getattr(want.mlp.experts, f"{name}_nf4_packed"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
