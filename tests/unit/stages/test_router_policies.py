"""Router policies: train and lora change the router, export merges it, and routing is reproduced."""

from __future__ import annotations

import pytest
import torch
from conftest import recipe_file, sft_recipe
from transformers import AutoModelForCausalLM

from finetune import runs
from finetune.export import export
from finetune.load import chain
from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft


def router_logits(model, ids):
    with torch.no_grad():
        return torch.stack(model(input_ids=ids, output_router_logits=True).router_logits)


@pytest.mark.parametrize("policy", ["train", "lora"])
def test_router_policy_trains_router_and_export_reproduces_routing(tmp_path, tiny_mixtral, sft_file, policy):
    recipe = sft_recipe(tmp_path, tiny_mixtral, sft_file, router={"policy": policy}, sft={"learning_rate": 5e-2, "max_steps": 3})
    run = run_sft(read_recipe(recipe_file(tmp_path, **recipe)))
    ids = torch.tensor([[1, 9, 4, 17, 22, 30, 5, 2]])
    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    adapted = chain.load_chain(runs.read_run(run), dtype="float32", keep_last=True)
    assert runs.read_run(run).metrics["trainable_parameters"]["router"] > 0
    adapted_logits = router_logits(adapted, ids)
    assert not torch.allclose(adapted_logits, router_logits(base, ids), atol=1e-4)  # the router changed

    out = export(str(run), str(tmp_path / "export"), dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(router_logits(exported, ids), adapted_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(router_logits(exported, ids).topk(2).indices, adapted_logits.topk(2).indices)
