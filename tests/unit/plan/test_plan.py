"""`finetune plan`: exact LoRA counts, the strategy table, bad input (exit 2), validate's warning."""

import json

import pytest
from plan_measure import random_config, wrapped_model

from finetune.cli import main
from finetune.lora.targets import trainable_by_group
from finetune.plan import hardware, plan
from finetune.plan.shapes import model_shape
from finetune.plan.warn import fit_warning
from finetune.recipe import read_recipe
from finetune.validate import check

MIXTRAL = "recipes/mixtral-8x7b/sft.yaml"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_lora_counts_equal_what_peft_trains(family):
    config = random_config(family, vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40)
    plan_, model = wrapped_model(config, "sdpa", r=4)
    _, meta = wrapped_model(config, "sdpa", r=4, meta=True)
    shape = model_shape(config, meta, plan_)
    assert shape.lora_by_group == {k: v for k, v in trainable_by_group(model, plan_).items() if v}


def test_mixtral_counts_and_table():
    checked = check(read_recipe(MIXTRAL))
    r = plan(checked, hardware.GPUS["h100-80gb"], gpus=8)
    assert r["params"]["total"] == 46_702_792_704
    assert r["params"]["lora_by_group"] == {"attention": 13_631_488, "experts": 209_715_200}  # README: 223M
    rows = {row["strategy"]: row for row in r["strategies"]}
    assert not rows["DDP"]["fits"] and rows["FSDP2"]["fits"]  # 93 GB of weights per GPU vs 1/8 of them
    assert rows["DDP"]["parts_gib"]["base weights"] == pytest.approx(46_702_792_704 * 2 / 2**30, abs=0.01)
    rec = r["recommended"]
    assert rec["strategy"] == "FSDP2" and rec["config"] == "recipes/accelerate/fsdp2.yaml"
    assert rec["global_batch"] == r["global_batch"] == 4 * 8 * 8
    assert "assumed" in rec["utilisation"]


def test_json_and_qwen3_offline(capsys):
    assert main(["plan", MIXTRAL, "--set", "model.name_or_path=Qwen/Qwen3-30B-A3B", "--set", "model.chat_template=x",
                 "--gpu", "a100-80gb", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["params"]["total"] == pytest.approx(30.5e9, rel=0.01)  # Qwen3-30B-A3B
    assert r["gpu"] == "a100-80gb"


@pytest.mark.parametrize("argv,says", [
    (["--gpu", "tpu-v9"], "known: h100-80gb"),
    (["--gpus", "0"], "--gpus"),
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--set", "lora.experts.targets=[w9]"], "lora.experts.targets"),
    (["--set", "model.name_or_path=/nonexistent/model"], "model.name_or_path"),
])
def test_bad_input_exits_2_without_traceback(argv, says, capsys):
    assert main(["plan", MIXTRAL, *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_validate_warning_only_with_cuda():
    checked = check(read_recipe(MIXTRAL))
    assert fit_warning(checked, cuda=False) is None
    said = fit_warning(checked, cuda=True, memory=80 * 2**30, world=1)
    assert "will not fit" in said and "FSDP2" not in said.split("Fixes:")[0] and "nf4" in said
    assert fit_warning(checked, cuda=True, memory=141 * 2**30 * 8, world=1) is None


def test_dpo_plans_chosen_and_rejected_as_twice_the_rows():
    from finetune.plan import setup_for, shape_of
    from finetune.plan.memory import Setup, activation_parts

    checked = check(read_recipe(MIXTRAL))
    m, s = shape_of(checked), setup_for(checked, 1, 1, False)
    dpo, doubled = Setup(**{**s.__dict__, "dpo": True}), Setup(**{**s.__dict__, "batch": 2 * s.batch})
    assert activation_parts(m, dpo) == activation_parts(m, doubled)
    assert activation_parts(m, dpo)["activations"] > activation_parts(m, s)["activations"]


def test_job_time_from_local_rows(capsys):
    from finetune.data.files import count_rows

    assert main(["plan", "recipes/tiny-moe/sft.yaml", "--gpu", "h100-80gb", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommended"]
    rows = sum(count_rows(f) for f in read_recipe("recipes/tiny-moe/sft.yaml").data.train)
    assert rec["steps"] == -(-rows // rec["global_batch"]) * 3  # 3 epochs
    assert rec["job_hours"] == pytest.approx(rec["steps"] * rec["step_seconds"] / 3600, rel=1e-3)


def test_launch_config_sets_strategy_and_processes(capsys):
    assert main(["plan", MIXTRAL, "--launch", "recipes/accelerate/fsdp2.yaml", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["gpus"] == 8 and r["launch"] == {"config": "recipes/accelerate/fsdp2.yaml", "strategy": "FSDP2",
                                              "fits": True, "largest_micro_batch": r["launch"]["largest_micro_batch"]}
    assert main(["plan", MIXTRAL, "--launch", "recipes/accelerate/ddp.yaml"]) == 0
    assert "DDP does not fit at any micro-batch" in capsys.readouterr().out
    assert main(["plan", MIXTRAL, "--launch", MIXTRAL]) == 2
    assert "not an accelerate config" in capsys.readouterr().err
