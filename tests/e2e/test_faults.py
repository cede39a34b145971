"""Faults a cluster job meets: a signal (preemption), a full disk, two writers on one output, no network.

Signals come from the test-only hook FINETUNE_FAULT_AT (finetune/runs/faults.py): the process sends
the signal to itself at a named point, so nothing depends on timing. Most cases run `cli.main` in
this process (its handlers are installed for the command and removed after it); one case runs a
real `python -m finetune` to check the process's exit status, and the slow ones run 2 processes.
Every case checks the exit status, the message, what is on disk afterwards, and, where a run was
cut, that `--resume` ends with the uninterrupted run's adapter bytes.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, recipe_file, sft_recipe

from finetune import cli, hub, modeling
from finetune.data import files as datafiles
from finetune.errors import UserError
from finetune.export import shards
from finetune.recipe import ModelSection
from finetune.runs.resume import incomplete_reason, newest_checkpoint

STEPS = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
ADAPTER = "adapter_model.safetensors"


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in extra or extra[k] is not None}
    return {**base, "OMP_NUM_THREADS": "1", **{k: v for k, v in extra.items() if v is not None},
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def recipe(tmp_path: Path, model, data, name: str, **sft) -> Path:
    return recipe_file(tmp_path, f"{name}.yaml", **sft_recipe(tmp_path, model, data, output_dir=str(tmp_path / name),
                                                              sft={**STEPS, **sft}))


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["-q", *argv])
    return code, capsys.readouterr().err


def leftovers(parent: Path) -> list[str]:
    """Temporary directories, moved-aside outputs and locks: none may survive a command."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and
                  (".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock")))


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_mixtral, sft_file):
    """The uninterrupted run every resumed run must equal, byte for byte."""
    tmp = tmp_path_factory.mktemp("whole")
    assert cli.main(["-q", "sft", str(recipe(tmp, tiny_mixtral, sft_file, "whole"))]) == 0
    return tmp / "whole"


@pytest.fixture
def cut(tmp_path, tiny_mixtral, sft_file):
    return recipe(tmp_path, tiny_mixtral, sft_file, "cut")


def resume_and_compare(capsys, err: str, whole: Path, out: Path) -> None:
    """Run the command the message printed; the adapter must be the uninterrupted run's."""
    command = err.split("continue with:")[1].strip().splitlines()[0]
    argv = shlex.split(command)
    assert argv[0] == "finetune" and argv[-1] == "--resume"
    code, err = run(capsys, *argv[1:])
    assert code == 0, err
    assert (out / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()
    assert leftovers(out.parent) == [] and not (out.parent / f".{out.name}.incomplete").exists()


# ---- preemption ---------------------------------------------------------------------------------

@pytest.mark.parametrize("point, step, sig, status, saved", [
    ("mid_step", 3, "TERM", 143, ["checkpoint-2", "checkpoint-3"]),  # saved at the boundary after step 3
    ("save", 2, "USR1", 143, ["checkpoint-2", "checkpoint-3"]),      # during the save of step 2: it completes
    ("mid_step", 3, "INT", 130, ["checkpoint-2", "checkpoint-3"]),   # Ctrl-C
])
def test_signal_during_training_saves_then_resume_matches(capsys, monkeypatch, tmp_path, whole, cut, point, step, sig,
                                                          status, saved):
    monkeypatch.setenv("FINETUNE_FAULT_AT", point)
    monkeypatch.setenv("FINETUNE_FAULT_STEP", str(step))
    monkeypatch.setenv("FINETUNE_FAULT_SIGNAL", sig)
    code, err = run(capsys, "sft", str(cut))
    assert code == status, err
    assert f"SIG{sig}: stopped at a step boundary and saved checkpoint" in err and "checkpoint-3" in err
    checkpoints = tmp_path / ".cut.incomplete" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == saved
    assert all(incomplete_reason(checkpoints / name) is None for name in saved)
    assert not (tmp_path / "cut").exists() and leftovers(tmp_path) == []
    monkeypatch.delenv("FINETUNE_FAULT_AT")
    resume_and_compare(capsys, err, whole, tmp_path / "cut")


def test_signal_during_data_preparation_leaves_the_previous_run(capsys, monkeypatch, tmp_path, whole, cut):
    shutil.copytree(whole, tmp_path / "cut")  # a finished run that --overwrite would replace
    before = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.is_file()}
    monkeypatch.setenv("FINETUNE_FAULT_AT", "data")
    code, err = run(capsys, "sft", str(cut), "--overwrite")
    assert code == 143 and "SIGTERM: interrupted; the outputs are as they were before" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.is_file()} == before
    assert not (tmp_path / ".cut.incomplete").exists() and leftovers(tmp_path) == []


def test_signal_during_the_final_swap_completes_it(capsys, monkeypatch, tmp_path, whole, cut):
    monkeypatch.setenv("FINETUNE_FAULT_AT", "swap")
    code, err = run(capsys, "sft", str(cut))
    assert code == 143 and f"the run had already finished; it is complete at {tmp_path / 'cut'}" in err
    assert (tmp_path / "cut" / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()
    assert (tmp_path / "cut" / "chain.json").is_file() and not (tmp_path / "cut" / "checkpoints").exists()
    assert not (tmp_path / ".cut.incomplete").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_real_process_exit_status_and_second_signal(tmp_path, tiny_mixtral, sft_file):
    """A real process: SIGTERM mid-step exits 143 after the checkpoint; two signals exit at once."""
    path = recipe(tmp_path, tiny_mixtral, sft_file, "cut")
    command = [sys.executable, "-m", "finetune", "-q", "sft", str(path)]
    twice = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env=env(FINETUNE_FAULT_AT="mid_step", FINETUNE_FAULT_STEP="3", FINETUNE_FAULT_REPEAT="2"))
    assert twice.returncode == 143 and "SIGTERM again: exiting at once" in twice.stderr, twice.stderr[-2000:]
    checkpoints = tmp_path / ".cut.incomplete" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]  # no save after the second signal
    once = subprocess.run([*command, "--resume"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=env(FINETUNE_FAULT_AT="mid_step", FINETUNE_FAULT_STEP="4"))
    assert once.returncode == 143, once.stderr[-2000:]
    assert "saved checkpoint" in once.stderr and f"finetune -q sft {path} --resume" in once.stderr
    assert newest_checkpoint(checkpoints).name == "checkpoint-4"


# ---- disk space ---------------------------------------------------------------------------------

def test_checkpoint_that_cannot_fit_is_refused_before_writing(capsys, monkeypatch, tmp_path, cut):
    real = shutil.disk_usage
    monkeypatch.setattr("finetune.runs.diskspace.shutil.disk_usage",
                        lambda p: real(p)._replace(free=123_000))
    code, err = run(capsys, "sft", str(cut))
    assert code == 2 and "the next checkpoint at" in err and "needs about" in err and "123.0 KB free" in err
    assert str(tmp_path / ".cut.incomplete" / "checkpoints") in err
    assert not (tmp_path / ".cut.incomplete").exists() and not (tmp_path / "cut").exists()
    assert leftovers(tmp_path) == []


def test_disk_filling_up_during_a_checkpoint_keeps_the_last_one(capsys, monkeypatch, tmp_path, whole, cut):
    save = torch.save

    def full_at_step_4(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_4)
    code, err = run(capsys, "sft", str(cut))
    assert code == 2 and "a checkpoint at" in err and "did not fit" in err and "free on that file system" in err
    assert "Traceback" not in err
    checkpoints = tmp_path / ".cut.incomplete" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]  # the half-written one is gone
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(torch, "save", save)
    code, err = run(capsys, "sft", str(cut), "--resume")
    assert code == 0, err
    assert (tmp_path / "cut" / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()


@pytest.fixture
def exported(capsys, tmp_path, whole):
    """A previous export at tmp_path/exp, and its files' bytes."""
    code, err = run(capsys, "export", str(whole), "--output", str(tmp_path / "exp"), "--dtype", "float32")
    assert code == 0, err
    return {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()}


def still(path: Path, files: dict) -> bool:
    return {p.name: p.read_bytes() for p in path.iterdir()} == files


def test_export_full_disk_and_signal_leave_the_previous_export(capsys, monkeypatch, tmp_path, whole, exported):
    argv = ["export", str(whole), "--output", str(tmp_path / "exp"), "--dtype", "float32"]

    def full(self, key, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    with monkeypatch.context() as m:  # another process fills the disk after the check
        m.setattr(shards.ShardWriter, "write", full)
        code, err = run(capsys, *argv)
    assert code == 2 and f"the export at {tmp_path}: needs about" in err and "free on that file system" in err, err
    assert still(tmp_path / "exp", exported) and leftovers(tmp_path) == []
    real = shutil.disk_usage
    with monkeypatch.context() as m:
        m.setattr("finetune.runs.diskspace.shutil.disk_usage", lambda p: real(p)._replace(free=5000))
        code, err = run(capsys, *argv)
    assert code == 2 and "5.0 KB free" in err and still(tmp_path / "exp", exported) and leftovers(tmp_path) == []
    monkeypatch.setenv("FINETUNE_FAULT_AT", "export")
    code, err = run(capsys, *argv)
    assert code == 143 and "SIGTERM: interrupted" in err
    assert still(tmp_path / "exp", exported) and leftovers(tmp_path) == []


def _tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at path; the reason when this machine does not allow it."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "no mount command (not Linux)"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}"


def test_export_onto_a_small_real_file_system(capsys, tmp_path, whole):
    mount = tmp_path / "small"
    reason = _tmpfs(mount, "256k")
    if reason:
        pytest.skip(reason)
    try:
        code, err = run(capsys, "export", str(whole), "--output", str(mount / "exp"), "--dtype", "float32")
        assert code == 2 and f"the export at {mount}: needs about" in err, err
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ---- one writer per output ----------------------------------------------------------------------

def test_second_run_on_the_same_output_is_refused(capsys, tmp_path, whole, cut):
    first = subprocess.Popen([sys.executable, "-m", "finetune", "-q", "sft", str(cut)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(FINETUNE_FAULT_AT="mid_step", FINETUNE_FAULT_STEP="2", FINETUNE_FAULT_SIGNAL="STOP"))
    try:
        proc = psutil.Process(first.pid)
        while proc.status() != psutil.STATUS_STOPPED:  # frozen by its own SIGSTOP, mid-step 2
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)
        for flags in ([], ["--resume"], ["--overwrite"]):
            code, err = run(capsys, "sft", str(cut), *flags)
            assert code == 2 and f"pid {first.pid} on host {socket.gethostname()}" in err, err
            assert "one writer per output" in err
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert (tmp_path / "cut" / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()
    # -q in a real process (in pytest, logging is pytest's): the summary only; no step lines
    # (logging_steps 1), raw metric dicts or progress bars
    assert "SFT finished" in stdout and "{'loss'" not in stdout + stderr and "it/s]" not in stderr
    assert not [line for line in stderr.splitlines() if " finetune: step " in line or " finetune: eval at" in line]
    assert leftovers(tmp_path) == []


def test_stale_and_foreign_locks(capsys, tmp_path, whole, exported):
    lock = tmp_path / ".exp.lock"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    argv = ["export", str(whole), "--output", str(tmp_path / "exp"), "--dtype", "float32"]
    lock.write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead}, "started": 0, "command": "finetune export"}}')
    code, err = run(capsys, *argv)
    assert code == 2 and f"stale lock {lock} from pid {dead}" in err and "pass --overwrite" in err
    assert still(tmp_path / "exp", exported)
    code, err = run(capsys, *argv, "--overwrite")  # taken over
    assert code == 0, err
    assert not lock.exists()
    lock.write_text('{"host": "node-17", "pid": 4242, "started": 0, "command": "finetune export"}')
    code, err = run(capsys, *argv, "--overwrite")
    assert code == 2 and "pid 4242 on host node-17" in err and f"delete {lock}" in err and "never taken over" in err
    assert lock.exists()


# ---- network ------------------------------------------------------------------------------------

def test_unreachable_hub_is_one_message_in_seconds(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://hub.invalid")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub._verdicts.clear()
    started = time.perf_counter()
    with pytest.raises(UserError) as model_error:
        modeling.load_config(ModelSection(name_or_path="some-org/no-such-moe"))
    assert time.perf_counter() - started < 5
    text = str(model_error.value)
    assert "`some-org/no-such-moe`" in text and "hub.invalid" in text and "does not resolve" in text
    assert "no local copy in the cache" in text and "HF_HUB_OFFLINE=1" in text
    # With a copy in the cache the message says so (and how to use it).
    (tmp_path / "cache" / "datasets--some-org--chats" / "snapshots" / "abc").mkdir(parents=True)
    with pytest.raises(UserError) as data_error:
        datafiles.read_rows("some-org/chats:train")
    text = str(data_error.value)
    assert "data set `some-org/chats`" in text and "a local copy is in the cache" in text and "HF_HUB_OFFLINE=1" in text
    hub._verdicts.clear()


@pytest.mark.slow  # a fresh interpreter importing torch: ~12 s of CPU
def test_unreachable_hub_from_the_command_line(tmp_path):
    path = recipe_file(tmp_path, model={"name_or_path": "some-org/no-such-moe"}, data={"train": ["x.jsonl"]})
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finetune", "validate", str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env=env(HF_ENDPOINT="http://hub.invalid", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE=None))
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and "`some-org/no-such-moe` cannot be fetched" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and seconds < 60, seconds  # the check itself: < 5 s (test above)


# ---- two processes (slow) -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layout", [2, "fsdp2", "zero3"])
def test_signal_on_one_rank_stops_both_and_resume_matches(tmp_path, tiny_mixtral, sft_file, layout):
    """SIGTERM reaches rank 1 only, mid-step 3: both ranks save checkpoint-3 (none waits in a
    collective), the job exits, and --resume under the same launcher gives the uninterrupted bytes."""
    from test_resume import _command  # the launch commands of the kill -9 tests

    sft = {**STEPS, "per_device_train_batch_size": 2}
    paths = {name: recipe_file(tmp_path, f"{name}.yaml", **sft_recipe(
        tmp_path, tiny_mixtral, sft_file, output_dir=str(tmp_path / name), sft=sft)) for name in ("whole", "cut")}
    done = subprocess.run(_command(layout, paths["whole"]), cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env())
    assert done.returncode == 0, done.stderr[-3000:]
    cut = subprocess.run(_command(layout, paths["cut"]), cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env=env(FINETUNE_FAULT_AT="mid_step", FINETUNE_FAULT_STEP="3", FINETUNE_FAULT_RANK="1"))
    assert cut.returncode != 0, cut.stderr[-3000:]
    log = cut.stdout + cut.stderr
    assert "SIGTERM received: finishing this step" in log and log.count("stopped at a step boundary") == 1, log[-3000:]
    assert "-m finetune -q sft" in log and "--resume" in log
    checkpoints = tmp_path / ".cut.incomplete" / "checkpoints"
    assert newest_checkpoint(checkpoints).name == "checkpoint-3" and not (tmp_path / "cut").exists()
    assert leftovers(tmp_path) == []
    again = subprocess.run(_command(layout, paths["cut"], "--resume"), cwd=tmp_path, capture_output=True, text=True,
                           timeout=900, env=env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "cut" / ADAPTER).read_bytes() == (tmp_path / "whole" / ADAPTER).read_bytes()
