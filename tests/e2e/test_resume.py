"""Exact resume: an interrupted run continued with --resume ends where an uninterrupted one does.

Default suite: an in-process interrupt (KeyboardInterrupt after a checkpoint), resume, bytes and
totals compared; checkpoint selection; the refusals around interrupted runs. Slow: `kill -9` of a
real `python -m finetune sft` (1 process) and of `torchrun --nproc_per_node 2` (2 processes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, recipe_file, sft_recipe
from transformers import TrainerCallback

from finetune import cli
from finetune.errors import UserError
from finetune.recipe import read_recipe
from finetune.runs.resume import incomplete_reason, newest_checkpoint
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft

STEPS = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def make(tmp_path, model, data, name, **sft):
    return read_recipe(recipe_file(tmp_path, f"{name}.yaml", **sft_recipe(
        tmp_path, model, data, output_dir=str(tmp_path / name), sft={**STEPS, **sft})))


def last(history: list[dict], key: str):
    return [e[key] for e in history if key in e][-1]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_mixtral, sft_file, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    whole = run_sft(make(tmp_path, tiny_mixtral, sft_file, "whole"))
    with pytest.raises(KeyboardInterrupt):
        run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut"), callbacks=[InterruptAt(3)])
    staging = tmp_path / ".cut.incomplete"
    assert not (tmp_path / "cut").exists() and newest_checkpoint(staging / "checkpoints").name == "checkpoint-2"
    before = json.loads((staging / "checkpoints" / "checkpoint-2" / "finetune_totals.json").read_text())["train_seconds"]

    resumed = run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut"), resume=True)
    # a second run of the same data and the resumed run load the prepared data from the cache
    prepared = [r.getMessage().split(",")[1].split("(")[0].strip() for r in caplog.records if "rows tokenized here" in r.getMessage()]
    assert prepared[1:] == ["cache hit", "cache hit"], prepared
    assert (resumed / "adapter_model.safetensors").read_bytes() == (whole / "adapter_model.safetensors").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert b["resumed_from"] == "checkpoint-2" and b["tokens_seen"] == a["tokens_seen"] > 0
    assert b["final"]["train_loss"] == pytest.approx(a["final"]["train_loss"], rel=1e-6)
    # Wall time counts the session before the interruption (to its checkpoint) too.
    assert a["seconds_before_resume"] is None and 0 < before == b["seconds_before_resume"] < b["seconds"]
    # Drift is measured against the true starting model, not against checkpoint-2.
    for key in ("routing/kl_max", "routing/topk_overlap_min"):
        assert last(b["log_history"], key) == pytest.approx(last(a["log_history"], key), rel=1e-5, abs=1e-9)
    assert not staging.exists() and not (resumed / "checkpoints").exists()


def test_interrupted_run_is_never_discarded_silently(tmp_path, tiny_mixtral, sft_file, capsys):
    with pytest.raises(KeyboardInterrupt):
        run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut"), callbacks=[InterruptAt(3)])
    path = recipe_file(tmp_path, "again.yaml", **sft_recipe(tmp_path, tiny_mixtral, sft_file,
                                                            output_dir=str(tmp_path / "cut"), sft=STEPS))
    for flags in ([], ["--overwrite"]):
        assert cli.main(["-q", "sft", str(path), *flags]) == 2
        err = capsys.readouterr().err
        assert "checkpoint-2" in err and "--resume" in err and ".cut.incomplete" in err
    # A changed recipe does not resume silently either.
    assert cli.main(["-q", "sft", str(path), "--resume", "--set", "sft.learning_rate=0.5"]) == 2
    assert "sft.learning_rate" in capsys.readouterr().err
    assert newest_checkpoint(tmp_path / ".cut.incomplete" / "checkpoints").name == "checkpoint-2"


def test_resume_without_checkpoint_says_how_to_start(tmp_path, tiny_mixtral, sft_file, capsys):
    path = recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file))
    assert cli.main(["-q", "sft", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "without --resume" in err
    assert not list(tmp_path.glob(".*incomplete"))


def test_half_written_checkpoint_is_skipped(tmp_path, tiny_mixtral, sft_file):
    with pytest.raises(KeyboardInterrupt):
        run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut", max_steps=6), callbacks=[InterruptAt(5)])
    checkpoints = tmp_path / ".cut.incomplete" / "checkpoints"
    assert newest_checkpoint(checkpoints).name == "checkpoint-4"
    (checkpoints / "checkpoint-4" / "trainer_state.json").unlink()  # as if killed mid-save
    assert "unreadable" in incomplete_reason(checkpoints / "checkpoint-4")
    assert newest_checkpoint(checkpoints).name == "checkpoint-2"
    (checkpoints / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    assert newest_checkpoint(checkpoints) is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut", max_steps=6), resume=True)


# ---- kill -9 of real processes (slow) ----



def _command(nproc, recipe: Path, *extra: str) -> list[str]:
    if nproc == "zero3":  # 2 CPU processes under DeepSpeed ZeRO-3 (tests/e2e/test_distributed.py's config)
        from test_distributed import zero3_test_config

        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(zero3_test_config(recipe.parent)), str(REPO / "tests" / "cpu_launch.py"), "-q", "sft",
                str(recipe), *extra]
    if nproc == "fsdp2":  # 2 CPU processes under accelerate's FSDP2 config, through the tests' shim
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"), "--mixed_precision", "no",
                str(REPO / "tests" / "cpu_launch.py"), "-q", "sft", str(recipe), *extra]
    if nproc == 1:
        return [sys.executable, "-m", "finetune", "-q", "sft", str(recipe), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "finetune", "-q", "sft", str(recipe), *extra]


def _run(cmd, cwd) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


def _env() -> dict:
    # the shim and its subprocesses import finetune from this checkout
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _wait_gone(pid: int) -> None:
    try:
        while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.05)
    except psutil.NoSuchProcess:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2, "fsdp2", "zero3"])
def test_kill_9_then_resume_gives_identical_adapter(tmp_path, tiny_mixtral, sft_file, nproc):
    ranks = nproc if isinstance(nproc, int) else 2
    sft = {"max_steps": 40, "save_steps": 5, "logging_steps": 5, "per_device_train_batch_size": 4 // ranks}
    recipe = {name: recipe_file(tmp_path, f"{name}.yaml", **sft_recipe(
        tmp_path, tiny_mixtral, sft_file, output_dir=str(tmp_path / name), sft=sft)) for name in ("whole", "cut")}
    _run(_command(nproc, recipe["whole"]), tmp_path)

    checkpoints = tmp_path / ".cut.incomplete" / "checkpoints"
    proc = subprocess.Popen(_command(nproc, recipe["cut"]), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while newest_checkpoint(checkpoints) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # Every rank and the launcher at once, no cleanup (torchrun starts each rank in its own session).
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in family[1:]:
        _wait_gone(pid)
    taken = newest_checkpoint(checkpoints)
    assert taken is not None and not (tmp_path / "cut").exists()
    assert int(taken.name.split("-")[1]) < 40, "the run finished before it could be killed"

    _run(_command(nproc, recipe["cut"], "--resume"), tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert (cut / "adapter_model.safetensors").read_bytes() == (whole / "adapter_model.safetensors").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert b["resumed_from"] is not None and b["tokens_seen"] == a["tokens_seen"]
    assert b["world_size"] == ranks


def test_dpo_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_mixtral, sft_file, pref_file):
    sft = run_sft(make(tmp_path, tiny_mixtral, sft_file, "sft", max_steps=2))

    def dpo(name):
        return read_recipe(recipe_file(tmp_path, f"{name}.yaml", output_dir=str(tmp_path / name), from_run=str(sft),
                                       data={"train": [str(pref_file)], "max_length": 64},
                                       lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
                                       dpo={**STEPS, "per_device_train_batch_size": 4, "learning_rate": 5e-2}))

    whole = run_dpo(dpo("whole"))
    with pytest.raises(KeyboardInterrupt):
        run_dpo(dpo("cut"), callbacks=[InterruptAt(3)])
    resumed = run_dpo(dpo("cut"), resume=True)
    assert (resumed / "adapter_model.safetensors").read_bytes() == (whole / "adapter_model.safetensors").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert b["resumed_from"] == "checkpoint-2" and b["tokens_seen"] == a["tokens_seen"] > 0
    assert json.loads((resumed / "chain.json").read_text())[1]["run"] == "../sft"
