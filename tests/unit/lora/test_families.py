"""LoRA targets found from the module tree for MoE families other than Mixtral: MLA attention,
shared experts, dense first layers, routers named `router` or wrapping a Linear; the trainable
count `finetune validate` prints (from shapes) equals PEFT's count after wrapping."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MistralConfig,
    Qwen2MoeConfig,
)

from finetune.lora.targets import (
    expected_trainable,
    lora_config,
    resolve_targets,
    trainable_by_group,
)
from finetune.moe import find_routers, structure
from finetune.recipe import LoraGroup, LoraSection, RouterSection

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
             "max_position_embeddings": 64}


def deepseek_v3():
    return DeepseekV3Config(**SMALL, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                            first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                            topk_group=1, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=16,
                            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)


def qwen2_moe():
    return Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                          num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)


def gpt_oss():
    return GptOssConfig(**SMALL, intermediate_size=16, num_hidden_layers=2, num_local_experts=4,
                        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8)


def build(config, meta=True):
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def test_deepseek_v3_mla_attention_shared_experts_and_dense_first_layer():
    model = build(deepseek_v3())
    parts = structure(model)
    assert [p.moe for p in parts] == [False, True, True]
    assert parts[0].dense_mlp == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    targets, problems = resolve_targets(LoraSection(), RouterSection(), model, moe=True)
    assert problems == []
    assert targets.groups["attention"].targets == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    assert targets.groups["experts"].targets == ["gate_up_proj", "down_proj"]
    assert targets.groups["shared_experts"].targets == [
        "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]
    assert targets.groups["mlp"].targets == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    # the router keeps its correction-bias buffer; it is found in the MoE layers only
    assert [r.name for r in find_routers(model)] == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]


def test_qwen2_moe_shared_expert_and_its_gate():
    targets, problems = resolve_targets(LoraSection(), RouterSection(), build(qwen2_moe()), moe=True)
    assert problems == []
    assert targets.groups["shared_experts"].targets == [
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
        "mlp.shared_expert_gate"]
    assert "mlp" not in targets.groups


def test_gpt_oss_router_named_router():
    model = build(gpt_oss())
    targets, problems = resolve_targets(LoraSection(), RouterSection(policy="train"), model, moe=True)
    assert problems == []
    assert targets.router_modules == ["mlp.router"]


def test_groups_the_model_lacks_are_errors():
    model = build(qwen2_moe())
    section = LoraSection(mlp=LoraGroup())
    _, problems = resolve_targets(section, RouterSection(), model, moe=True)
    assert [p.where for p in problems] == ["lora.mlp"] and "no dense MLP layers" in str(problems[0])
    _, problems = resolve_targets(LoraSection(shared_experts=LoraGroup()), RouterSection(), build(gpt_oss()), moe=True)
    assert [p.where for p in problems] == ["lora.shared_experts"]


def test_moe_model_whose_experts_cannot_be_adapted_names_the_type():
    # An MoE config whose experts are not fused 3-D parameters: never train attention only.
    model = build(MistralConfig(**SMALL, intermediate_size=16, num_hidden_layers=2))
    _, problems = resolve_targets(LoraSection(), RouterSection(), model, moe=True)
    assert [p.where for p in problems] == ["lora.experts"]
    assert "`mistral`" in str(problems[0]) and "cannot be adapted" in str(problems[0])


@pytest.mark.parametrize("make,policy", [(deepseek_v3, "lora"), (qwen2_moe, "train"), (gpt_oss, "lora")])
def test_trainable_count_from_shapes_equals_peft(make, policy):
    config = make()
    meta = build(config)
    router = RouterSection(policy=policy, lora=LoraGroup(r=4, alpha=8.0) if policy == "lora" else None)
    section = LoraSection(attention=LoraGroup(r=2), experts=LoraGroup(r=3))
    targets, problems = resolve_targets(section, router, meta, moe=True)
    assert problems == []
    expected = expected_trainable(meta, targets)
    wrapped = get_peft_model(build(config, meta=False), lora_config(targets))
    assert trainable_by_group(wrapped, targets) == expected
    assert set(expected) == set(targets.groups) | {"router"}


def test_export_delta_of_square_in_out_experts_matches_peft():
    """gpt-oss stores experts (E, in, out); with in == out the shapes cannot tell the orientation,
    so export follows PEFT's own flag (a transposed delta once failed the export check by 0.91)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import ParamWrapper

    from finetune.export.deltas import Term

    config = gpt_oss()
    config.intermediate_size = config.hidden_size  # down_proj (E, 32, 32): square
    model = get_peft_model(build(config, meta=False), LoraConfig(r=2, target_parameters=["experts.down_proj"]))
    module = next(m for m in model.modules() if isinstance(m, ParamWrapper))
    torch.nn.init.normal_(module.lora_B["default"].weight)
    shape = tuple(module.get_param().shape)
    assert shape[1] == shape[2]
    term = Term("add", "p", "m", {"A": module.lora_A["default"].weight.detach(), "B": module.lora_B["default"].weight.detach()},
                float(module.scaling["default"]), shape, in_out=not module._did_swap_in_out_features)
    torch.testing.assert_close(term.value(), module.get_delta_weight("default").detach().float())
