"""Each logger's scalars read back from <run>/logs with the logger's own reader, offline; logs
survive the finish and --resume continues them.

tensorboard and trackio are in the `test` extra (CI reads them); wandb and mlflow skip unless their
extras are installed (pip install -e '.[test,wandb,mlflow]'). trackio is read back with its own
storage reader in a fresh process, which finds the store through TRACKIO_DIR as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_file, sft_recipe
from transformers import TrainerCallback

from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft
from finetune.train.loggers import mlflow_uri

INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]
STEPS = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}


def make(tmp_path, model, data, name, **extra):
    return read_recipe(recipe_file(tmp_path, f"{name}.yaml", **sft_recipe(
        tmp_path, model, data, output_dir=str(tmp_path / name), sft={**STEPS, "report_to": INSTALLED},
        router={"aux_loss_coef": 0.02}, **extra)))


def history(run: Path, key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in json.loads((run / "metrics.json").read_text())["log_history"] if key in e}


@pytest.fixture(scope="module", autouse=True)
def wandb_offline():
    """No network in tests: W&B writes its run files only (set before wandb starts a run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        yield


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_mixtral, sft_file):
    """One SFT run logging to every installed logger, with sample answers."""
    if not INSTALLED:
        pytest.skip("no logger installed: pip install -e '.[tensorboard]'")
    tmp = tmp_path_factory.mktemp("logged")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello there"}) + "\n")
    return run_sft(make(tmp, tiny_mixtral, sft_file, "run", samples={"every": 2, "prompts": str(prompts),
                                                                      "max_new_tokens": 4}))


KEYS = ("loss", "aux_loss", "routing/imbalance_max", "routing/layer0/entropy", "learning_rate")


def test_tensorboard_scalars_read_back(logged_run):
    pytest.importorskip("tensorboard", reason="finetune[tensorboard] not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "logs" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in KEYS:
        logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert logged == pytest.approx(history(logged_run, key), rel=1e-6), key
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    answers = [json.loads(line) for line in (logged_run / "samples.jsonl").read_text().splitlines()]
    assert sorted(texts) == [2, 4] and [r["step"] for r in answers] == [2, 4]
    assert all(f"**hello there**\n\n{r['answer']}" == texts[r["step"]] for r in answers)


def test_mlflow_scalars_read_back(logged_run):
    pytest.importorskip("mlflow", reason="finetune[mlflow] not installed")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(logged_run / "logs"))
    run_id = (logged_run / "logs" / "mlflow-run-id").read_text().strip()
    for key in KEYS:
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == pytest.approx(history(logged_run, key), rel=1e-6), key
    tags = client.get_run(run_id).data.tags
    answers = [json.loads(line) for line in (logged_run / "samples.jsonl").read_text().splitlines()]
    assert [tags[f"samples/step_{r['step']:07d}"] for r in answers] == [f"**hello there**\n\n{r['answer']}" for r in answers]


def wandb_records(path: Path):
    """The protobuf records of a .wandb file. wandb 0.31 has no Python reader left (its core, in Go,
    reads them), so this follows the format wandb documents in its datastore: a 7-byte header
    (":W&B", magic 0xBEE1, version 0), then LevelDB-log blocks of 32 KiB whose chunks carry a crc32
    (4 bytes), a length (2), a type (1: whole record, 2/3/4: first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run: Path) -> list[dict]:
    """History rows of the offline W&B run."""
    (path,) = (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_scalars_read_back(logged_run):
    pytest.importorskip("wandb", reason="finetune[wandb] not installed")
    rows = [r for r in wandb_history(logged_run) if "train/loss" in r]
    for key in KEYS:
        logged = {r["train/global_step"]: r[f"train/{key}"] for r in rows if f"train/{key}" in r}
        assert logged == pytest.approx(history(logged_run, key), rel=1e-6), key
    tables = sorted((logged_run / "logs" / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    answers = [json.loads(line) for line in (logged_run / "samples.jsonl").read_text().splitlines()]
    assert [json.loads(t.read_text())["data"] for t in tables] == [[[r["step"], "hello there", r["answer"]]] for r in answers]


def trackio_rows(run: Path, name: str) -> list[dict]:
    """The rows trackio stored for run `name` in <run>/logs/trackio, read by trackio's storage layer
    in a new process (trackio reads TRACKIO_DIR when imported). Project: TrainingArguments' default."""
    code = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
            "print(json.dumps(SQLiteStorage.get_logs('huggingface', sys.argv[1]), default=str))")
    env = {**os.environ, "TRACKIO_DIR": str(run / "logs" / "trackio")}
    proc = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_trackio_scalars_read_back(logged_run):
    pytest.importorskip("trackio", reason="finetune[trackio] not installed")
    stored = trackio_rows(logged_run, "run")
    rows = [r for r in stored if "train/loss" in r]
    for key in KEYS:
        logged = {r["train/global_step"]: r[f"train/{key}"] for r in rows if f"train/{key}" in r}
        assert logged == pytest.approx(history(logged_run, key), rel=1e-6), key
    tables = [r["samples"] for r in stored if "samples" in r]
    answers = [json.loads(line) for line in (logged_run / "samples.jsonl").read_text().splitlines()]
    assert [t["_type"] for t in tables] == ["trackio.table"] * 2
    assert [t["_value"] for t in tables] == [[{"step": r["step"], "prompt": "hello there", "answer": r["answer"]}] for r in answers]


class InterruptAfterLog(TrainerCallback):
    """Ctrl-C right after the loggers wrote step `step` (after checkpoint 2: what resume rewinds)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and "loss" in (logs or {}):
            raise KeyboardInterrupt


def test_logs_survive_finish_and_resume_continues_them(tmp_path, tiny_mixtral, sft_file):
    pytest.importorskip("tensorboard", reason="finetune[tensorboard] not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(KeyboardInterrupt):
        run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut"), callbacks=[InterruptAfterLog(3)])
    assert (tmp_path / ".cut.incomplete" / "logs" / "tensorboard").is_dir()
    out = run_sft(make(tmp_path, tiny_mixtral, sft_file, "cut"), resume=True)
    assert not (tmp_path / ".cut.incomplete").exists() and not (out / "checkpoints").exists()
    events = EventAccumulator(str(out / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    # step 3 was logged before the interrupt and again after the resume: shown once, the resumed value
    assert steps == [1, 2, 3, 4]
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(history(out, "loss"), rel=1e-6)
    if "mlflow" in INSTALLED:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri(out / "logs"))
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1  # the resumed session continued the same MLflow run
        assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == {1, 2, 3, 4}
    if "trackio" in INSTALLED:  # a second run in this process (after logged_run): its own store, one run
        rows = [r for r in trackio_rows(out, "cut") if "train/loss" in r]
        # trackio cannot remove points: step 3 of the interrupted session stays beside the resumed one
        assert [r["train/global_step"] for r in rows] == [1, 2, 3, 3, 4]
        assert {r["train/global_step"]: r["train/loss"] for r in rows} == pytest.approx(history(out, "loss"), rel=1e-6)
