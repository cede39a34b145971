"""Router hooks find every MoE router, PEFT-wrapped or not, and respect padding (capture.py)."""

import pytest
import torch
from conftest import moe_model
from peft import LoraConfig, get_peft_model

from finetune.moe import find_routers
from finetune.routing.capture import RoutingCapture

VOCAB = 50




@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    return ids, mask


def route(model, ids, mask):
    with torch.no_grad(), RoutingCapture(model) as cap:
        model(input_ids=ids, attention_mask=mask)
    return cap.last


def test_finds_one_router_per_layer_and_records_shapes(batch):
    model = moe_model(VOCAB, layers=3).eval()
    routers = find_routers(model)
    assert [r.layer for r in routers] == [0, 1, 2]
    assert routers[0].name == "model.layers.0.mlp.gate"
    r = route(model, *batch)
    assert r.layers == [0, 1, 2]
    assert r.logits[0].shape == (2, 6, 8) and r.topk[0].shape == (2, 6, 2)
    assert r.mask.tolist() == batch[1].bool().tolist()
    # Column 0 is the first choice: the highest logit.
    assert torch.equal(r.topk[1][..., 0], r.logits[1].argmax(-1))


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["gate"]),  # router trained in full
        LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"]),  # LoRA on router
    ],
    ids=["modules_to_save", "target_parameters"],
)
def test_peft_wrapped_routers_are_hooked_once_and_follow_disable_adapter(batch, lora):
    base = moe_model(VOCAB, layers=2).eval()
    plain = route(base, *batch)
    model = get_peft_model(base, lora).eval()
    routers = find_routers(model)
    assert [r.layer for r in routers] == [0, 1]
    assert all(r.name.endswith("mlp.gate") for r in routers)
    with torch.no_grad():  # move the router off its initial weights
        for name, p in model.named_parameters():
            if p.requires_grad and ("gate" in name or "lora" in name):
                p.add_(torch.randn_like(p))
    adapted = route(model, *batch)
    assert not torch.allclose(adapted.logits[0], plain.logits[0])
    with model.disable_adapter():
        disabled = route(model, *batch)
    assert torch.allclose(disabled.logits[0], plain.logits[0], atol=1e-6)


def test_padding_does_not_change_what_is_recorded_for_real_tokens(batch):
    model = moe_model(VOCAB, layers=2).eval()
    ids, mask = batch
    padded = route(model, ids, mask)
    alone = route(model, ids[1:, :4], mask[1:, :4])
    assert torch.equal(padded.topk[0][1, :4], alone.topk[0][0])


def test_counts_mode_counts_training_forwards_only(batch):
    model = moe_model(VOCAB, layers=2)
    ids, mask = batch
    with RoutingCapture(model, mode="counts", train_only=True) as cap:
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        with torch.no_grad():  # a reference / probe forward: not counted
            model(input_ids=ids, attention_mask=mask)
        model.eval()
        model(input_ids=ids, attention_mask=mask)  # evaluation: not counted
    real = int(mask.sum())
    assert float(cap.tokens) == real
    assert cap.counts.sum(-1).tolist() == [2.0 * real] * 2  # top-2: two assignments per token
    full = route(model.train(), ids, mask)  # the same forward recorded in full
    assert cap.entropy_sum.shape == (2,)
    from finetune.routing.metrics import expert_counts

    assert torch.equal(cap.counts[0], expert_counts(full.topk[0], full.mask, 8))


def test_gradient_checkpointing_recompute_is_not_counted_twice(batch):
    model = moe_model(VOCAB, layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = batch
    with RoutingCapture(model, mode="counts", train_only=True) as cap:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert float(cap.tokens) == int(mask.sum())
    assert cap.counts.sum().item() == 2 * 2 * int(mask.sum())


def test_dense_model_is_refused_with_a_clear_message():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="no MoE routers"):
        RoutingCapture(MistralForCausalLM(config))


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_other_moe_families_with_topk_routers(family):
    import transformers

    names = {"qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe"}[family]
    config_cls = getattr(transformers, f"{names}Config")
    model_cls = getattr(transformers, f"{names}ForCausalLM")
    extra = {"qwen2_moe": {"shared_expert_intermediate_size": 16, "mlp_only_layers": [1]}, "qwen3_moe": {"head_dim": 8}}
    config = config_cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        eos_token_id=1, pad_token_id=0, **extra.get(family, {}),
    )
    model = model_cls(config).eval()
    r = route(model, torch.randint(4, VOCAB, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    # Qwen2-MoE's layer 1 is dense (mlp_only_layers): layers are named by their decoder index.
    assert r.layers == ([0, 2] if family == "qwen2_moe" else [0, 1, 2])
    assert r.topk[0].shape == (2, 5, 2) and r.logits[0].shape == (2, 5, 8)
