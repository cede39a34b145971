"""SFT end to end on tiny random models: what trains, what stays bit-identical, what is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import recipe_file, sft_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft


def base_name(name: str) -> str:
    """PEFT-wrapped parameter name -> the plain model's name."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


class Snapshot(TrainerCallback):
    """Trainable parameters before training, and every parameter after."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}


def train(tmp_path, model_dir, data, **extra):
    snap = Snapshot()
    recipe = read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, model_dir, data, **extra)))
    out = run_sft(recipe, callbacks=[snap])
    return out, snap


def assert_base_untouched(model_dir, snap, exclude=()):
    original = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    checked = 0
    for name in snap.frozen:
        if any(x in name for x in exclude):
            continue
        assert torch.equal(snap.after[name], original[base_name(name)]), f"{name} changed"
        checked += 1
    assert checked >= len(original) - 1


@pytest.mark.parametrize("expert_path", ["peft", "fast"])
def test_sft_trains_every_adapter_and_nothing_else(tmp_path, tiny_mixtral, sft_file, expert_path):
    out, snap = train(tmp_path, tiny_mixtral, sft_file, lora={"expert_path": expert_path})
    assert snap.before, "nothing was trainable"
    for name, before in snap.before.items():
        assert "lora_" in name, f"unexpected trainable parameter {name}"
        assert not torch.equal(before, snap.after[name]), f"{name} did not change"
    assert_base_untouched(tiny_mixtral, snap)  # includes the frozen router mlp.gate.weight

    adapter = load_file(out / "adapter_model.safetensors")
    for layer in range(2):
        for part in ("experts.base_layer.lora_A", "experts.base_layer.lora_B", "experts.lora_A", "experts.lora_B"):
            assert any(f"layers.{layer}.mlp.{part}" in k for k in adapter), f"layer {layer} lacks {part}"
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"experts.gate_up_proj", "experts.down_proj"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"]["experts"] > 0 and metrics["trainable_parameters"]["attention"] > 0
    assert "router" not in metrics["trainable_parameters"]
    assert (out / "chain.json").is_file() and (out / "recipe.yaml").is_file()
    assert "[INST]" in (out / "chat_template.jinja").read_text()


def test_per_group_ranks_reach_expert_parameters(tmp_path, tiny_mixtral, sft_file):
    out, _ = train(tmp_path, tiny_mixtral, sft_file, lora={"attention": {"r": 2, "alpha": 4}, "experts": {"r": 6, "alpha": 12}})
    adapter = load_file(out / "adapter_model.safetensors")
    experts = 4
    assert adapter["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape[0] == 6 * experts
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2


def test_router_train_changes_and_saves_router(tmp_path, tiny_mixtral, sft_file):
    out, snap = train(tmp_path, tiny_mixtral, sft_file, router={"policy": "train"}, lora={"expert_path": "peft"})
    trained = {n: p for n, p in snap.before.items() if "mlp.gate" in n}
    assert len(trained) == 2  # one router per layer
    for name, before in trained.items():
        assert not torch.equal(before, snap.after[name])
    assert_base_untouched(tiny_mixtral, snap, exclude=("modules_to_save",))
    adapter = load_file(out / "adapter_model.safetensors")
    assert sum("mlp.gate" in k for k in adapter) == 2
    assert json.loads((out / "metrics.json").read_text())["trainable_parameters"]["router"] == 2 * 4 * 32


def test_dense_mistral_trains_attention_and_mlp(tmp_path, tiny_mistral, sft_file):
    recipe = sft_recipe(tmp_path, tiny_mistral, sft_file)
    recipe["lora"] = {"attention": {"r": 4}, "mlp": {"r": 4}}
    snap = Snapshot()
    out = run_sft(read_recipe(recipe_file(tmp_path, **recipe)), callbacks=[snap])
    groups = json.loads((out / "metrics.json").read_text())["trainable_parameters"]
    assert set(groups) == {"attention", "mlp"}
    assert_base_untouched(tiny_mistral, snap)


def test_adapter_loads_with_plain_peft(tmp_path, tiny_mixtral, sft_file):
    out, _ = train(tmp_path, tiny_mixtral, sft_file)
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tiny_mixtral)!r})
ids = torch.tensor([[1, 5, 9, 13, 2]])
plain = base(input_ids=ids).logits
model = PeftModel.from_pretrained(base, {str(out)!r})
tuned = model(input_ids=ids).logits
assert 'finetune' not in sys.modules
print((tuned - plain).abs().max().item())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) > 0  # the adapter is applied


def test_output_dir_is_not_overwritten_by_accident(tmp_path, tiny_mixtral, sft_file):
    from finetune.errors import UserError

    train(tmp_path, tiny_mixtral, sft_file)
    with pytest.raises(UserError, match="already holds a finished run.*--overwrite"):
        train(tmp_path, tiny_mixtral, sft_file)


def test_same_recipe_same_adapter(tmp_path, tiny_mixtral, sft_file):
    """Seeded before TRL builds the PEFT model, so a recipe reproduces its adapter bit for bit."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, _ = train(tmp_path / "a", tiny_mixtral, sft_file)
    second, _ = train(tmp_path / "b", tiny_mixtral, sft_file)
    assert (first / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()
