"""Experiment loggers (`report_to` in a recipe's sft:/dpo: section): checked before any weights
load, pointed at `<run>/logs/`, continued (not duplicated) by `--resume`.

    finetune validate recipes/mixtral-8x7b/sft.yaml   # a logger that is not installed is an error here
    finetune sft recipes/mixtral-8x7b/sft.yaml        # TensorBoard events in <run>/logs/tensorboard

The loggers themselves are transformers' callbacks (TensorBoardCallback, WandbCallback,
MLflowCallback, TrackioCallback); this module only says where they write. Logs go to the staging
directory's logs/ (finish renames the whole staging directory into place and removes only its
checkpoints/), so they survive the finish, the swap and a resume.
Layer: train; imports errors (the logger libraries inside functions: optional extras).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import uuid
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import Problem, did_you_mean

# logger name in report_to -> (module that must import, pip extra of this package)
LOGGERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
LOGS = "logs"


def requested(section: dict) -> list[str]:
    """The logger names of a (checked) sft:/dpo: section."""
    value = section.get("report_to", "none")
    names = [value] if isinstance(value, str) else list(value or [])
    return [n for n in names if n != "none"]


def problems(section: dict, stage: str) -> list[Problem]:
    """report_to values that would fail or write somewhere else: unknown, not installed, `all`."""
    where = f"{stage}.report_to"
    value = section.get("report_to", "none")
    if value is None:
        return []
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        return [Problem(where, f"expected a logger name or a list of them ({', '.join(LOGGERS)}), got {value!r}")]
    out = []
    for name in [value] if isinstance(value, str) else value:
        if name == "none":
            continue
        if name == "all":
            # `all` means whatever happens to be installed: a run that logs differently per machine
            out.append(Problem(where, f"`all`: name the loggers instead, e.g. [tensorboard] (one of {', '.join(LOGGERS)})"))
        elif name not in LOGGERS:
            out.append(Problem(where, f"`{name}` is not a logger finetune supports (one of {', '.join(LOGGERS)}, "
                                      "or none)" + did_you_mean(name, LOGGERS)))
        elif importlib.util.find_spec(LOGGERS[name][0]) is None:
            extra = LOGGERS[name][1]
            out.append(Problem(where, f"{name} is not installed: pip install 'finetune[{extra}]' "
                                      f"(or pip install -e '.[{extra}]' in a checkout), or remove it from report_to"))
    return out


def logs_dir(staging: Path) -> Path:
    return staging / LOGS


def configure(trainer, staging: Path, resume_from: Path | None) -> None:
    """Point the trainer's reporters at `<staging>/logs/`; on --resume, continue the same logs.

    Called on every rank after the trainer is built; only rank 0 writes (the callbacks check)."""
    from transformers.integrations import (  # the reporters' classes; their libraries load when used
        MLflowCallback,
        TensorBoardCallback,
        TrackioCallback,
        WandbCallback,
    )

    logs = logs_dir(staging)
    handler = trainer.callback_handler
    resume_step = int(resume_from.name.rpartition("-")[2]) if resume_from is not None else None
    for cb in list(handler.callbacks):
        if isinstance(cb, (TensorBoardCallback, WandbCallback, MLflowCallback, TrackioCallback)) and trainer.is_world_process_zero():
            logs.mkdir(parents=True, exist_ok=True)
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(logs / "tensorboard")
            if resume_step is not None and cb._SummaryWriter is not None:
                # events the interrupted session wrote after its checkpoint are hidden, then rewritten
                cb._SummaryWriter = functools.partial(cb._SummaryWriter, purge_step=resume_step + 1)
        elif isinstance(cb, WandbCallback):
            handler.callbacks.insert(handler.callbacks.index(cb), _WandbRun(logs, resume_step is not None))
            handler.callbacks.insert(handler.callbacks.index(cb) + 1, _WandbFinish())
        elif isinstance(cb, MLflowCallback):
            ours = os.getenv("MLFLOW_TRACKING_URI") in (None, "", *_OUR_MLFLOW_URIS)
            id_file = logs / "mlflow-run-id"
            run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
            handler.callbacks.insert(handler.callbacks.index(cb), _MlflowStore(logs, ours, run_id))
            handler.callbacks.insert(handler.callbacks.index(cb) + 1, _RecordMlflowRun(id_file))
        elif isinstance(cb, TrackioCallback):
            point_trackio(logs / "trackio")
            if trainer.args.run_name is None:
                # trackio names an unnamed run at random; --resume continues a run by its name
                trainer.args.run_name = run_name(trainer.args)


def run_name(args) -> str:
    """The run directory's name (output_dir is <parent>/.<name>.incomplete/checkpoints while it trains)."""
    return Path(args.output_dir).parent.name.lstrip(".").removesuffix(".incomplete")


# TRACKIO_DIR values this module set, as _OUR_MLFLOW_URIS below: a second run in one process (the
# pipeline's DPO after its SFT) must not take the first run's directory for the user's choice.
_OUR_TRACKIO_DIRS: set[str] = set()


def point_trackio(store: Path) -> None:
    """trackio's database goes to `store`, unless the user set TRACKIO_DIR.

    trackio reads TRACKIO_DIR once, when it is imported (the Trainer's TrackioCallback imported it
    already), and several of its modules keep their own copy of that directory and of the media
    and artifact directories under it; it has no per-run setting. So the environment variable is
    set for later imports, and each loaded trackio module's copies are moved under `store`."""
    user = os.environ.get("TRACKIO_DIR")
    if user and user not in _OUR_TRACKIO_DIRS:
        return
    import trackio.utils  # optional extra finetune[trackio]; validate checked it is installed

    os.environ["TRACKIO_DIR"] = str(store)
    _OUR_TRACKIO_DIRS.add(str(store))
    old = trackio.utils.TRACKIO_DIR
    for name, module in list(sys.modules.items()):
        if name == "trackio" or name.startswith("trackio."):
            for attr, value in list(vars(module).items()):
                if attr.isupper() and isinstance(value, Path) and value.is_relative_to(old):
                    setattr(module, attr, store / value.relative_to(old))


class _WandbRun(TrainerCallback):
    """Starts the W&B run before transformers' WandbCallback (which then uses it): files under
    <run>/logs/wandb, and one run id kept there so that --resume continues the same run."""

    def __init__(self, logs: Path, resume: bool):
        self.logs, self.resume = logs, resume

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import wandb  # optional extra finetune[wandb]; validate checked it is installed

        id_file = self.logs / "wandb-run-id"
        run_id = id_file.read_text().strip() if self.resume and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        if wandb.run is None:
            wandb.init(project=os.getenv("WANDB_PROJECT", "finetune"), dir=str(self.logs), id=run_id,
                       resume="allow", name=run_name(args))


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; a second run in one process (the
# pipeline's DPO after its SFT) must not mistake the first run's store for the user's choice.
_OUR_MLFLOW_URIS: set[str] = set()


def mlflow_uri(logs: Path) -> str:
    return f"sqlite:///{(logs / 'mlflow.db').resolve()}"


class _MlflowStore(TrainerCallback):
    """Runs before transformers' MLflowCallback starts its run. Without a tracking URI of the
    user's: a local store in <run>/logs (sqlite: MLflow 3 refuses its file store unless
    MLFLOW_ALLOW_FILE_STORE is set); MLflowCallback keeps a URI already set. On --resume: the
    interrupted session's run id in MLFLOW_RUN_ID, which mlflow.start_run continues."""

    def __init__(self, logs: Path, ours: bool, run_id: str | None):
        self.logs, self.ours, self.run_id = logs, ours, run_id

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import mlflow  # optional extra finetune[mlflow]; validate checked it is installed

        if mlflow.active_run() is not None:  # left open by an interrupted session in this process
            mlflow.end_run()
        if self.ours:
            uri = mlflow_uri(self.logs)
            _OUR_MLFLOW_URIS.add(uri)
            mlflow.set_tracking_uri(uri)
            name = os.getenv("MLFLOW_EXPERIMENT_NAME", "finetune")
            if mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=(self.logs / "mlflow-artifacts").resolve().as_uri())
            mlflow.set_experiment(name)
        if self.run_id:
            os.environ["MLFLOW_RUN_ID"] = self.run_id


class _WandbFinish(TrainerCallback):
    """Ends the W&B run after transformers' WandbCallback is done with it (that callback leaves it
    open), so its files are complete when the run directory is swapped into place."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            import wandb  # optional extra finetune[wandb]

            if wandb.run is not None:
                wandb.finish()


class _RecordMlflowRun(TrainerCallback):
    """Writes the MLflow run id transformers' MLflowCallback started, for --resume to continue it."""

    def __init__(self, id_file: Path):
        self.id_file = id_file

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import mlflow  # optional extra finetune[mlflow]

        os.environ.pop("MLFLOW_RUN_ID", None)  # set by _MlflowStore for this run only
        run = mlflow.active_run()
        if run is not None:
            self.id_file.write_text(run.info.run_id + "\n")
