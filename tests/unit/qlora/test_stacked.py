"""QLoRA through both stages on a tiny Mixtral: SFT and DPO on a 4-bit base (finetune/qlora/__init__.py,
finetune/qlora/chain.py). The DPO reference is base + SFT adapter (first-step rewards are 0),
the 4-bit base never changes, and the adapters load with plain PEFT on the unquantized base.

Run: `pytest tests/unit/qlora/test_stacked.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import recipe_file, sft_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback

from finetune import runs
from finetune.load import chain
from finetune.recipe import read_recipe
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft
from finetune.validate import check


def packed_bytes(model) -> dict[str, torch.Tensor]:
    """Every 4-bit tensor of the model (experts' NF4 buffers and Linear4bit weights), cloned."""
    out = {}
    for name, t in list(model.named_buffers()) + list(model.named_parameters()):
        if "_nf4_" in name or type(t).__name__ == "Params4bit":
            out[name.replace("base_model.model.", "").replace(".base_layer", "")] = t.detach().clone()
    return out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_mixtral, sft_file):
    tmp = tmp_path_factory.mktemp("qsft")
    # router LoRA too: the router stays 16-bit on a 4-bit base, and DPO must stack its LoRA as well
    recipe = sft_recipe(tmp, tiny_mixtral, sft_file, sft={"learning_rate": 5e-2, "max_steps": 4}, router={"policy": "lora"})
    recipe["model"]["quantization"] = "nf4"
    return run_sft(read_recipe(recipe_file(tmp, **recipe)))


def test_sft_run_trains_adapters_only_and_loads_with_plain_peft(sft_run, tiny_mixtral):
    run = runs.read_run(sft_run)
    assert run.recipe.model.quantization == "nf4"
    quant = chain.load_chain(run)  # 4-bit base + the adapter, unmerged
    base4 = chain.load_chain(run).get_base_model()  # fresh 4-bit base, to compare bytes with the trained one
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        with quant.disable_adapter():
            before = quant(ids).logits
        after = quant(ids).logits
    assert (after - before).abs().max() > 1e-3  # the adapter does something
    # plain PEFT on the 16-bit base: the files are standard
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32), str(sft_run))
    names = {n for n, _ in plain.named_parameters() if "lora_" in n}
    assert any(".experts." in n for n in names) and any("q_proj" in n for n in names) and any("mlp.gate" in n for n in names)
    with torch.no_grad():
        plain_logits = plain(ids).logits
    # same adapter on the 16-bit base: close to the 4-bit model, not equal (NF4 error)
    assert 0 < (plain_logits - after).abs().max() < 0.5 * after.abs().max()
    assert packed_bytes(base4).keys() == packed_bytes(quant).keys()


class Snapshot(TrainerCallback):
    """The 4-bit bytes, the SFT ("ref") adapter and every other frozen tensor, before and after training."""

    @staticmethod
    def take(model):
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()  # router, norms, embeddings, SFT LoRA
                  if not p.requires_grad and p.stride() != (0,) * p.ndim and type(p).__name__ != "Params4bit"}
        return packed_bytes(model), frozen

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before, self.model = self.take(model), model
        self.ref_frozen = [not p.requires_grad for n, p in model.named_parameters() if ".ref." in n]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after, self.active = self.take(model), set(model.active_adapters)


def test_dpo_on_4bit_reference_is_sft_and_base_never_changes(tmp_path, sft_run, pref_file):
    path = recipe_file(
        tmp_path, "dpo.yaml", output_dir=str(tmp_path / "dpo-run"), from_run=str(sft_run),
        data={"train": [str(pref_file)], "max_length": 64},
        lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}}, router={"policy": "lora"},
        dpo={"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2},
    )
    assert check(read_recipe(path), "dpo").recipe.model.quantization == "nf4"  # inherited from the SFT run
    snap = Snapshot()
    out = run_dpo(read_recipe(path), callbacks=[snap])
    run = runs.read_run(out)
    logs = [e for e in run.metrics["log_history"] if "rewards/chosen" in e]
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0  # policy == reference
    assert any(e["rewards/margins"] != 0.0 for e in logs[1:])  # and then they part
    (packed0, frozen0), (packed1, frozen1) = snap.before, snap.after
    assert packed0.keys() == packed1.keys() and len(packed0) > 0
    assert all(torch.equal(packed0[k], packed1[k]) for k in packed0)
    assert any(".ref." in n for n in frozen0) and snap.ref_frozen and all(snap.ref_frozen)
    assert any("mlp.gate" in n and "lora" not in n for n in frozen0)
    assert frozen0.keys() == frozen1.keys() and all(torch.equal(frozen0[n], frozen1[n]) for n in frozen0)
    assert snap.active == {"ref", "default"}
    # the run holds the DPO adapter only, in standard files; the chain is base -> sft -> dpo
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    assert [link["kind"] for link in run.chain] == ["base", "sft", "dpo"]
    assert "ref" in run.metrics["reference"]


def test_export_of_4bit_run_merges_into_16bit_base(tmp_path, sft_run, tiny_mixtral):
    """The export is the 16-bit base + adapter (exact against the 16-bit chain) and sits within the
    measured NF4 gap of the 4-bit model it was trained as."""
    from finetune.export import export

    out = export(str(sft_run), str(tmp_path / "export"), dtype="float32")
    manifest = json.loads((out / "export.json").read_text())
    checks = manifest["checks"]  # merged into the 16-bit weights, exactly (streaming export's checks)
    assert checks["tensors"]["max_relative_error"] <= 1e-5 and checks["forward"]["merge_relative_error"] <= 1e-4
    assert 0 < manifest["nf4_base_gap"] and manifest["nf4_chain_relative_error"] <= manifest["nf4_tolerance"]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32), str(sft_run))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("nf4" in k for k in exported.state_dict())


def test_4bit_dpo_must_target_the_sft_runs_parameters(tmp_path, sft_run, pref_file):
    """The SFT adapter stays loaded under the DPO one; PEFT refuses differing target_parameters,
    so validation says so first (the SFT run has router LoRA, this recipe a frozen router)."""
    from finetune.errors import UserError

    path = recipe_file(tmp_path, "dpo.yaml", output_dir=str(tmp_path / "dpo-run"), from_run=str(sft_run),
                       data={"train": [str(pref_file)], "max_length": 64}, router={"policy": "freeze"})
    with pytest.raises(UserError) as err:
        check(read_recipe(path), "dpo")
    assert any(p.where == "lora" and "mlp.gate.weight" in p.what for p in err.value.problems)
    assert not (tmp_path / "dpo-run").exists()
