"""Aux loss or not, per curated MoE family (finetune/balancing.py), checked against the real forward.

For every family with an aux loss: with the recipe's coefficient applied, the model's aux loss
equals transformers' load_balancing_loss_func on the router logits captured by hooks on the
routers finetune/moe.py finds, and the model's own loss is cross-entropy plus coefficient x aux.
For every family without one: the forward returns none, validate refuses a coefficient, and the
default coefficient resolves to 0 (Llama-4's config declares one its forward never uses).
"""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
from conftest import REPO, recipe_file
from transformers import AutoModelForCausalLM

from finetune import balancing, modeling
from finetune.errors import UserError
from finetune.moe import find_routers, unwrap
from finetune.recipe import read_recipe
from finetune.train.save import print_summary
from finetune.validate import check
from finetune.validate.resolve import resolved_recipe


def tiny_configs():
    spec = importlib.util.spec_from_file_location("tiny_configs", REPO / "bench" / "tiny_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# model type -> (aux loss, router parameters, router buffers): the spec, checked against the forward below
FAMILIES = {
    "mixtral": (True, ["weight"], []),
    "qwen2_moe": (True, ["weight"], []),
    "qwen3_moe": (True, ["weight"], []),
    "qwen3_5_moe_text": (True, ["weight"], []),
    "qwen3_next": (True, ["weight"], []),
    "olmoe": (True, ["weight"], []),
    "gpt_oss": (True, ["weight", "bias"], []),
    "granitemoe": (True, ["weight"], []),
    "phimoe": (True, ["weight"], []),
    "deepseek_v3": (False, ["weight"], ["e_score_correction_bias"]),
    "glm4_moe": (False, ["weight"], ["e_score_correction_bias"]),
    "llama4_text": (False, ["weight"], []),
    "gemma4_text": (False, ["scale", "per_expert_scale", "proj.weight"], []),
}


def tiny_config(model_type: str):
    config = tiny_configs().tiny_config(model_type)
    if getattr(config, "enable_moe_block", None) is False:  # Gemma-4: the MoE block is off by default
        config.enable_moe_block, config.num_experts, config.top_k_experts, config.moe_intermediate_size = True, 4, 2, 32
    config.attn_implementation = "eager"
    return config


def captured_router_logits(model, run):
    """Router logits (tokens, experts) per MoE layer, from hooks on find_routers' modules."""
    seen = []
    hooks = [r.module.register_forward_hook(lambda m, i, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for r in find_routers(model)]
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return result, tuple(s.reshape(-1, s.shape[-1]) for s in seen)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_balancing_matches_its_forward(model_type):
    aux, params, buffers = FAMILIES[model_type]
    config = tiny_config(model_type)
    found = balancing.of_model(config, modeling.meta_model(config))  # what validate reads, on the meta device
    assert (found.aux_loss, found.router_parameters, found.router_buffers) == (aux, params, buffers)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    coef = 0.25
    model.config.output_router_logits = True  # as saved in some checkpoints: apply_aux_loss switches it off
    balancing.apply_aux_loss(model, coef if aux else 0.0, found)
    assert getattr(modeling.text_config(model.config), "output_router_logits", False) is False
    ids = torch.randint(3, 900, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: excluded from the aux loss
    with torch.no_grad():
        # the flag TRL passes on its training forward
        out, logits = captured_router_logits(
            model, lambda: model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True))
        plain = model(input_ids=ids, attention_mask=mask, labels=ids)
        assert getattr(plain, "aux_loss", None) is None  # the config's switch is off
    if not aux:
        assert getattr(out, "aux_loss", None) is None
        assert balancing.default_coef(found) == 0.0
        assert balancing.coef_problems(0.01, found)[0].where == "router.aux_loss_coef"
        assert balancing.coef_problems(0.0, found) == []
        return
    family = importlib.import_module(type(model).__module__)
    cfg = modeling.text_config(config)
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    expected = family.load_balancing_loss_func(logits, experts, cfg.num_experts_per_tok, mask)
    assert len(logits) == len(find_routers(model)) == len(out.router_logits)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-6, atol=1e-7)
    assert out.aux_loss.item() > 0.5  # a real value (about 1 for balanced routing), not a zero that passes anyway
    torch.testing.assert_close(out.loss, plain.loss + coef * expected, rtol=1e-6, atol=1e-6)

    # What SFT and DPO train with: TRL's fused LM head forward computes the aux loss itself from the
    # backbone's router logits (Mixtral's function, text_config.num_experts, the config's coefficient)
    from trl.trainer.utils import add_fused_lm_head

    modeling.alias_expert_count(model.config)  # as load_pretrained does (Phi-3.5-MoE, Granite-MoE)
    add_fused_lm_head(model)
    with torch.no_grad():
        fused, logits = captured_router_logits(model, lambda: model(
            input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True, fused_lm_head=True))
    torch.testing.assert_close(fused.aux_loss, family.load_balancing_loss_func(logits, experts, cfg.num_experts_per_tok,
                                                                               mask), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.aux_loss, out.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.loss, plain.loss + coef * fused.aux_loss, rtol=1e-5, atol=1e-5)


def test_apply_aux_loss_off_and_inference_switch():
    config = tiny_config("mixtral")
    model = AutoModelForCausalLM.from_config(config)
    found = balancing.of_model(config, model)
    model.config.output_router_logits = True
    balancing.apply_aux_loss(model, 0.3, found)
    assert (model.config.output_router_logits, model.config.router_aux_loss_coef, unwrap(model).router_aux_loss_coef) == \
        (False, 0.3, 0.3)
    model.config.output_router_logits = True
    balancing.router_logits_off(model)
    assert model.config.output_router_logits is False


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    """A tiny DeepSeek-V3 model directory: config.json is all validate reads."""
    path = tmp_path_factory.mktemp("deepseek")
    tiny_config("deepseek_v3").save_pretrained(path)
    return path


def deepseek_recipe(tmp_path, model_dir, sft_file, **router):
    return read_recipe(recipe_file(
        tmp_path, output_dir=str(tmp_path / "run"), model={"name_or_path": str(model_dir), "dtype": "float32"},
        data={"train": [str(sft_file)], "max_length": 64}, router=router, sft={"max_steps": 1}))


def test_validate_refuses_aux_loss_coef_on_deepseek_v3(tmp_path, deepseek_dir, sft_file):
    with pytest.raises(UserError) as info:
        check(deepseek_recipe(tmp_path, deepseek_dir, sft_file, aux_loss_coef=0.01))
    problems = info.value.problems
    assert [p.where for p in problems] == ["router.aux_loss_coef"]
    assert "model type `deepseek_v3` has no load-balancing aux loss" in str(problems[0])
    assert "e_score_correction_bias" in str(problems[0]) and "Remove router.aux_loss_coef" in str(problems[0])
    # 0 is off, not an error; the run records 0 and the summary says why there is no aux loss
    checked, recipe = resolved_recipe(deepseek_recipe(tmp_path, deepseek_dir, sft_file, aux_loss_coef=0.0), "sft")
    assert recipe.router.aux_loss_coef == 0.0
    assert checked.balancing.router_buffers == ["e_score_correction_bias"]


def test_llama4_default_coefficient_is_zero(tmp_path, sft_file):
    """Llama-4's config declares router_aux_loss_coef=0.001; TRL would multiply it by the None its forward returns."""
    path = tmp_path / "llama4"
    tiny_config("llama4_text").save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["router_aux_loss_coef"] == 0.001
    _, recipe = resolved_recipe(deepseek_recipe(tmp_path, path, sft_file), "sft")
    assert recipe.router.aux_loss_coef == 0.0


def test_run_summary_says_a_family_has_no_aux_loss(capsys, deepseek_dir):
    config = modeling.load_config(modeling.ModelSection(name_or_path=str(deepseek_dir)))
    found = balancing.of_model(config, modeling.meta_model(config))
    metrics = {"seconds": 1.0, "trainable_parameters": {"attention": 10}, "router_policy": "train",
               "router_aux_loss_coef": 0.0, "router_balancing": found.summary(0.0)}
    print_summary("sft", REPO, metrics)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("router:"))
    assert line.strip() == ("router: train, aux_loss_coef 0.0; no aux loss: DeepseekV3ForCausalLM's forward computes "
                            "none; its routers balance with the e_score_correction_bias buffer instead (aux-loss-free "
                            "balancing), which transformers does not update in training")


@pytest.mark.parametrize("model_type,policy,trained,frozen", [
    ("gpt_oss", "train", ["weight", "bias"], []),
    ("gpt_oss", "lora", ["lora"], ["bias", "weight"]),
    ("deepseek_v3", "train", ["weight"], []),
])
def test_router_policy_covers_router_parameters_and_keeps_buffers(model_type, policy, trained, frozen):
    """What policy_note says is what PEFT trains: one optimizer step moves exactly those router
    tensors; DeepSeek's e_score_correction_bias buffer stays as loaded."""
    from peft import get_peft_model

    from finetune.lora.targets import lora_config, resolve_targets
    from finetune.recipe import LoraSection, RouterSection

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    found = balancing.of_model(config, model)
    targets, problems = resolve_targets(LoraSection(experts=False), RouterSection(policy=policy), model,
                                        moe=True)
    assert problems == []
    wrapped = get_peft_model(model, lora_config(targets))
    router = find_routers(wrapped)[0].module
    before = {n: t.detach().clone() for n, t in [*router.named_parameters(), *router.named_buffers()]}
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # LoRA's B starts at zero: the second step moves the adapted weight
        ids = torch.randint(3, 900, (2, 8), generator=torch.Generator().manual_seed(2))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict([*router.named_parameters(), *router.named_buffers()])
    changed = sorted({n.rsplit(".", 1)[-1] if "lora" not in n else "lora"
                      for n in before if not torch.equal(before[n], after[n])})
    assert changed == sorted(trained)
    for name in frozen:
        assert any(n.endswith(name) and torch.equal(before[n], after[n]) for n in before)
    for name in found.router_buffers:
        copies = [n for n in before if n.endswith(name)]
        assert copies and all(torch.equal(before[n], after[n]) for n in copies)
    note = found.policy_note(policy)
    assert all(p in note for p in found.router_parameters) and all(b in note for b in found.router_buffers)


def test_docs_table_matches_the_computed_balancing():
    """docs/routing.md's per-family table: aux loss, declared coefficient, router parameters and buffers as computed."""
    text = (REPO / "docs" / "routing.md").read_text(encoding="utf-8")
    section = text[text.index("## Aux loss"):]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(FAMILIES)
    for model_type in FAMILIES:
        config = tiny_config(model_type)
        found = balancing.of_model(config, modeling.meta_model(config))
        cells = rows[model_type]
        assert cells[1].startswith("yes" if found.aux_loss else "no"), model_type
        coef = getattr(type(config)(), "router_aux_loss_coef", None)  # the config class's default
        assert ("`router_aux_loss_coef`" in cells[2]) == (coef is not None), model_type
        assert coef is None or f"`router_aux_loss_coef` {coef:g}" in cells[2], model_type
        assert cells[3].split(" (")[0] == ", ".join(found.router_parameters), model_type
        assert cells[4] == ", ".join(f"`{b}`" for b in found.router_buffers), model_type
