"""Two processes on CPU (gloo) through `accelerate launch` and the shipped configs: DDP, FSDP2, ZeRO-3.

FSDP2 and ZeRO-3 run through tests/cpu_launch.py, the shim that lets accelerate use them on CPU
processes (see its docstring); the code under test is finetune's, unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, recipe_file, sft_recipe
from safetensors.torch import load_file

from finetune import distributed
from finetune.errors import UserError
from finetune.recipe import read_recipe

CONFIGS = REPO / "recipes" / "accelerate"
SHIM = REPO / "tests" / "cpu_launch.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# Adapters from different process layouts agree to float32 rounding (measured on CPU, max
# relative difference per tensor: FSDP2 SFT and DPO 0, ZeRO-3 4.5e-6, 2 x 2 vs 1 x 4 without aux
# loss 8.1e-7); the tolerance leaves room for another summation order.
RTOL = 1e-5


def launch(cwd: Path, config: str | Path, *argv, shim: bool = False, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` with a shipped config (by name) or a config file, 2 CPU processes."""
    cmd = [*ACCELERATE, "--num_processes", str(processes)]
    if isinstance(config, Path):
        cmd += ["--config_file", str(config)]  # a DeepSpeed config file says its own precision
    else:
        cmd += ["--config_file", str(CONFIGS / f"{config}.yaml"), "--mixed_precision", "no"]
    cmd += [str(SHIM)] if shim else ["-m", "finetune"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def output(proc) -> str:
    return proc.stdout + proc.stderr


def ok(proc):
    assert proc.returncode == 0, output(proc)[-4000:]
    return proc


def max_rel_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].numel() > 0 for k in a)
    diff = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    print(f"{b_dir.name} vs {a_dir.parent.name}/{a_dir.name}: max relative difference {diff:.2e}")  # pytest -s shows it
    return diff


def trained(run: Path) -> bool:
    adapter = load_file(run / "adapter_model.safetensors")
    return any("experts.lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


def sharded_checks(log: str, stage: str) -> None:
    """What must hold in every sharded run's log: both ranks on the fast expert path, rank 1
    without a full copy of the weights (FSDP2), one summary, routing drift computed."""
    assert log.count("fast expert LoRA on 2 MoE layers") == 2, log[-3000:]
    assert "stock path" not in log
    assert log.count(f"{stage.upper()} finished") == 1


# ---- default suite ----------------------------------------------------------------------------


def test_cpu_ddp_config_starts_two_ranks(tmp_path, tiny_mixtral, sft_file):
    recipe = recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file, sft={"max_steps": 2, "per_device_train_batch_size": 2}))
    proc = ok(launch(tmp_path, "cpu-ddp", "sft", str(recipe)))
    out = tmp_path / "sft-run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert "rank 0/2: peak host RSS" in proc.stderr and "rank 1/2: peak host RSS" in proc.stderr
    assert proc.stdout.count("SFT finished") == 1  # only the main process writes and reports
    assert trained(out)
    # the main process prepared the data (finetune/dataprep.py), the other loaded its cache entry
    assert "rank 0/2: data: 48 rows tokenized here, cache entry prepared" in proc.stderr
    assert "rank 1/2: data: 0 rows tokenized here, cache hit" in proc.stderr


def test_world_size_mismatch_refused_on_every_rank_before_the_disk(tmp_path, tiny_mixtral, sft_file):
    # torchrun starts 2 ranks; with use_cpu=false on a machine without GPUs the trainer sees 1.
    recipe = recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finetune",
         "sft", str(recipe), "--set", "sft.use_cpu=false"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode != 0
    # each rank refuses on its own; torchrun may stop the other before it prints
    assert "the launcher started 2 processes but the trainer sees 1" in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # a UserError, not a crash
    assert "finetune/" not in proc.stderr  # no traceback from our code
    assert "SFT finished" not in proc.stdout
    assert not (tmp_path / "sft-run").exists()


def test_check_launch_compares_world_sizes(monkeypatch):
    class Args:
        world_size = 1

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="started 4 processes but the trainer sees 1"):
        distributed.check_launch(Args())
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_launch(Args())


def test_zero3_config_without_deepspeed_is_a_user_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError, match=r'pip install -e "\.\[deepspeed\]"'):
        distributed.require_deepspeed()


# ---- slow: sharded training equals single-process training --------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_mixtral, sft_file, pref_file):
    """One-process SFT and DPO runs (in this process) at the global batch of the 2-rank runs:
    per-device batch 2 with gradient accumulation 2, so every micro-batch (and so the router aux
    loss, computed per micro-batch) is the same as on 2 ranks x batch 2."""
    from finetune.stages.dpo import run_dpo
    from finetune.stages.sft import run_sft

    tmp = tmp_path_factory.mktemp("single")
    sft = sft_recipe(tmp, tiny_mixtral, sft_file, sft={"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    sft_run = run_sft(read_recipe(recipe_file(tmp, "sft.yaml", **sft)))
    dpo = dpo_sections(tmp / "dpo-run", sft_run, pref_file, gradient_accumulation_steps=2)
    dpo_run = run_dpo(read_recipe(recipe_file(tmp, "dpo.yaml", **dpo)))
    return tmp, sft_run, dpo_run


def dpo_sections(out: Path, parent: Path, pref_file: Path, **dpo) -> dict:
    return {
        "output_dir": str(out), "from_run": str(parent),
        "data": {"train": [str(pref_file)], "max_length": 64},
        "lora": {"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2, **dpo},
    }


def two_rank_sft_recipe(tmp_path, tiny_mixtral, sft_file, **sft):
    return recipe_file(tmp_path, "sft.yaml", **sft_recipe(tmp_path, tiny_mixtral, sft_file, sft={"max_steps": 2, "per_device_train_batch_size": 2, **sft}))


@pytest.mark.slow
def test_fsdp2_sft_and_dpo_equal_single_process(tmp_path, single, tiny_mixtral, sft_file, pref_file):
    _, single_sft, single_dpo = single
    proc = ok(launch(tmp_path, "fsdp2", "sft", str(two_rank_sft_recipe(tmp_path, tiny_mixtral, sft_file)), shim=True))
    log = output(proc)
    sharded_checks(log, "sft")
    assert "rank 1: built the model without weights" in log and "rank 0: loaded the weights" in log
    assert log.count("gathering 24 adapter tensors (24 sharded)") == 2  # every LoRA tensor was a DTensor shard
    sft_run = tmp_path / "sft-run"
    history = json.loads((sft_run / "metrics.json").read_text())["log_history"]
    assert any("routing/topk_overlap_min" in h and "routing/kl_max" in h for h in history)  # drift probe ran sharded
    assert max_rel_diff(single_sft, sft_run) < RTOL

    # DPO from the single-process SFT run, so both DPO runs have the same parent: rank 0 merges
    # the SFT chain, rank 1 builds the model without weights and receives the merged ones.
    dpo = recipe_file(tmp_path, "dpo.yaml", **dpo_sections(tmp_path / "dpo-run", single_sft, pref_file))
    proc = ok(launch(tmp_path, "fsdp2", "dpo", str(dpo), shim=True))
    log = output(proc)
    sharded_checks(log, "dpo")
    assert "rank 1: built the model without weights" in log
    assert max_rel_diff(single_dpo, tmp_path / "dpo-run") < RTOL


def zero3_test_config(tmp_path: Path) -> Path:
    """recipes/accelerate/zero3.yaml's settings as a DeepSpeed config file, plus two changes that
    make the tiny model a real test: every parameter partitioned (DeepSpeed keeps tensors under
    1e5 elements whole by default: all of the tiny model's), and DeepSpeed's own default leaf list
    (which names MixtralSparseMoeBlock since 0.19) emptied, so finetune's registration is what
    puts the MoE blocks on the fast path. Without it the run warns that the stock path is used."""
    shipped = yaml.safe_load((CONFIGS / "zero3.yaml").read_text())
    zero = shipped["deepspeed_config"]
    ds = {
        "zero_optimization": {
            "stage": zero["zero_stage"], "stage3_gather_16bit_weights_on_model_save": zero["zero3_save_16bit_model"],
            "stage3_param_persistence_threshold": 0, "leaf_module": {"classes": []},
        },
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config = {**shipped, "deepspeed_config": {"deepspeed_config_file": str(tmp_path / "ds.json"), "zero3_init_flag": zero["zero3_init_flag"]}}
    config.pop("mixed_precision")
    path = tmp_path / "zero3-test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
def test_zero3_sft_saves_the_adapter_equal_to_single_process(tmp_path, single, tiny_mixtral, sft_file):
    _, single_sft, _ = single
    recipe = two_rank_sft_recipe(tmp_path, tiny_mixtral, sft_file)
    proc = ok(launch(tmp_path, zero3_test_config(tmp_path), "sft", str(recipe), shim=True))
    log = output(proc)
    sharded_checks(log, "sft")  # the fast path served every MoE block (leaf modules gather their weights)
    assert log.count("2 MixtralSparseMoeBlock modules registered as leaves") == 2
    assert max_rel_diff(single_sft, tmp_path / "sft-run") < RTOL  # shapes equal and non-empty, values close


@pytest.mark.slow
def test_one_and_two_processes_agree_at_equal_global_batch_without_aux_loss(tmp_path, tiny_mixtral, sft_file):
    """1 x 4 against 2 x 2 (cpu-ddp): equal within 1e-5 once the router aux loss, which is
    computed per micro-batch (so over 4 rows vs 2), is off."""
    from finetune.stages.sft import run_sft

    one = sft_recipe(tmp_path / "one", tiny_mixtral, sft_file, router={"aux_loss_coef": 0.0},
                     sft={"max_steps": 2, "per_device_train_batch_size": 4})
    (tmp_path / "one").mkdir()
    one_run = run_sft(read_recipe(recipe_file(tmp_path / "one", **one)))
    two = sft_recipe(tmp_path, tiny_mixtral, sft_file, router={"aux_loss_coef": 0.0}, sft={"max_steps": 2, "per_device_train_batch_size": 2})
    ok(launch(tmp_path, "cpu-ddp", "sft", str(recipe_file(tmp_path, **two))))
    assert max_rel_diff(one_run, tmp_path / "sft-run") < 1e-5


@pytest.mark.slow
def test_fsdp2_config_that_accelerate_ignores_is_refused(tmp_path, tiny_mixtral, sft_file):
    """Without the shim accelerate 1.15 runs the FSDP2 config on CPU as plain DDP: refused, not run."""
    proc = launch(tmp_path, "fsdp2", "sft", str(two_rank_sft_recipe(tmp_path, tiny_mixtral, sft_file)))
    assert proc.returncode != 0
    assert "the accelerate config asks for fsdp2 but accelerate runs MULTI_CPU" in proc.stderr
    assert "SFT finished" not in proc.stdout
    assert not (tmp_path / "sft-run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lora", "train"])
def test_fsdp2_router_policies_equal_single_process(tmp_path, tiny_mixtral, sft_file, policy):
    """A router trained with LoRA or in full (modules_to_save) shards, trains and saves under
    FSDP2 as in one process: the saved adapter (router included) agrees within RTOL."""
    from finetune.stages.sft import run_sft

    router = {"policy": policy, **({"lora": {"r": 2, "alpha": 4}} if policy == "lora" else {})}
    (tmp_path / "one").mkdir()
    one = sft_recipe(tmp_path / "one", tiny_mixtral, sft_file, router=router,
                     sft={"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    single = run_sft(read_recipe(recipe_file(tmp_path / "one", "sft.yaml", **one)))
    two = recipe_file(tmp_path, "sft.yaml", **sft_recipe(tmp_path, tiny_mixtral, sft_file, router=router,
                                                         sft={"max_steps": 2, "per_device_train_batch_size": 2}))
    log = output(ok(launch(tmp_path, "fsdp2", "sft", str(two), shim=True)))
    sharded_checks(log, "sft")
    saved = load_file(tmp_path / "sft-run" / "adapter_model.safetensors")
    router_keys = [k for k in saved if ".mlp.gate." in k]
    assert router_keys and all(("lora_" in k) == (policy == "lora") for k in router_keys), router_keys
    if policy == "train":  # the router itself moved (two Adam steps), not only the LoRA factors
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(tiny_mixtral).model.layers[0].mlp.gate.weight
        assert not torch.equal(saved["base_model.model.model.layers.0.mlp.gate.weight"], start)
    else:
        assert all(saved[k].abs().max() > 0 for k in router_keys if "lora_B" in k)
    assert max_rel_diff(single, tmp_path / "sft-run") < RTOL
