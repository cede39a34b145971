"""`finetune validate` on MoE families other than Mixtral: the resolved targets of every LoRA group and
the trainable count are printed; a model type whose experts are not fused 3-D parameters (JetMoE)
is an error naming the type and the reason, exit status 2, never attention-only training."""

from __future__ import annotations

from pathlib import Path

from conftest import recipe_file, sft_recipe
from transformers import JetMoeConfig, Qwen2MoeConfig

from finetune.cli import main
from finetune.recipe import read_recipe
from finetune.validate import check

SMALL = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "num_hidden_layers": 2}


def config_dir(tmp_path: Path, config) -> Path:
    """A model directory with only config.json: validate builds the model on the meta device."""
    path = tmp_path / config.model_type
    config.save_pretrained(path)
    return path


def test_validate_prints_targets_per_group_and_the_trainable_count(tmp_path, sft_file, capsys):
    config = Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    recipe = sft_recipe(tmp_path, config_dir(tmp_path, config), sft_file)
    recipe["lora"]["shared_experts"] = {"r": 2, "alpha": 4}
    path = recipe_file(tmp_path, **recipe)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("experts (gate_up_proj, down_proj; r=4), shared_experts (mlp.shared_expert.gate_proj, "
            "mlp.shared_expert.up_proj, mlp.shared_expert.down_proj, mlp.shared_expert_gate; r=2)") in out
    trainable = check(read_recipe(path)).trainable
    per_group = ", ".join(f"{k} {v:,}" for k, v in trainable.items())
    assert f"trainable parameters: {sum(trainable.values()):,} ({per_group})" in out
    # r * (in + out) per adapted matrix, summed over layers: the count comes from shapes, not a guess
    layers, r = 2, 2  # three (32 <-> 16) projections and the (32 -> 1) shared-expert gate per layer
    assert trainable["shared_experts"] == layers * r * (3 * (32 + 16) + (32 + 1))


def test_moe_type_with_unfused_experts_is_a_validate_error_naming_the_type(tmp_path, sft_file, capsys):
    config = JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                          intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    path = recipe_file(tmp_path, **sft_recipe(tmp_path, config_dir(tmp_path, config), sft_file))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lora.experts: model type `jetmoe`: its experts cannot be adapted" in err
    assert "attention only" in err and "Traceback" not in err
