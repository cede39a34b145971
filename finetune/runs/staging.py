"""A run's staging directory: decide (no disk change), claim, guard against failure, finish and swap.

    finetune sft RECIPE [--overwrite] [--resume]     # each stage: reserve -> load/wrap -> claimed(...) -> finish

`reserve` runs every check on the destination and on an interrupted run's checkpoints before
anything is created or deleted. Inside `claimed`, the run trains into `<parent>/.<name>.incomplete/`;
an exception or a signal removes that directory again (nothing left behind) unless it holds a
complete checkpoint that --resume can continue (an out-of-memory error after hours keeps them,
and the log says so; a signal during training saves one first, finetune/runs/signals.py); kill -9
keeps whatever was there. `claimed` also holds the output's lock (finetune/runs/lock.py). `finish` writes the run files,
chain.json last, renames the staging directory into output_dir (the previous finished run is
moved aside and removed only after that rename) and drops the checkpoints.
Layer: runs.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import PartialState

from finetune import runs
from finetune.errors import CheckFailed, UserError
from finetune.recipe import Recipe, recipe_to_dict
from finetune.runs import faults, lock, outputs, signals
from finetune.runs.resume import incomplete_reason, newest_checkpoint

log = logging.getLogger("finetune")

START_RECIPE = "recipe.start.yaml"
"""The resolved recipe a staging directory was started with: --resume refuses a changed recipe."""


@dataclass
class RunDir:
    out: Path
    staging: Path
    resume_from: Path | None = None
    takeover: bool = False
    """--resume or --overwrite given: a stale lock of this host may be taken over (runs/lock.py)."""


def staging_for(recipe: Recipe) -> Path:
    return outputs.staging_dir(Path(recipe.output_dir).resolve())


def _protected(recipe: Recipe) -> dict[str, str]:
    protected = {}
    if Path(recipe.model.name_or_path).exists():
        protected["the base model"] = recipe.model.name_or_path
    if recipe.from_run:
        protected["the parent run (from_run)"] = recipe.from_run
    for source in [*recipe.data.train, *recipe.data.eval]:
        path = Path(getattr(source, "path", source))  # a string, or a DataSource mapping's path
        if str(path) and path.exists():
            protected[f"data file {source}'s directory"] = str(path.resolve().parent)
    return protected


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (--resume compares recipes with it)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def reserve(recipe: Recipe, overwrite: bool, resume: bool) -> RunDir:
    """Where the run goes and what it resumes from; a UserError, with nothing touched, if it may not."""
    out = outputs.check_destination(recipe.output_dir, "run", overwrite, _protected(recipe))
    staging = outputs.staging_dir(out)
    if _main_process():  # another writer first: its staging directory is not ours to judge
        lock.check(out, "output_dir", overwrite or resume, "--resume or --overwrite")
    if staging.exists() and not ((staging / outputs.MARKER).is_file() or outputs.is_finished_run(staging)):
        raise UserError(f"{staging} exists and was not made by this project; move it away, or choose another output_dir")
    ckpt = newest_checkpoint(staging / "checkpoints") if staging.is_dir() else None
    if resume:
        if ckpt is None:
            raise UserError(f"--resume: no complete checkpoint in {staging / 'checkpoints'} to continue; "
                            f"run without --resume to start {out} fresh")
        started = yaml.safe_load((staging / START_RECIPE).read_text()) if (staging / START_RECIPE).is_file() else None
        changed = changed_keys(started, recipe_to_dict(recipe)) if isinstance(started, dict) else []
        if changed:
            raise UserError(f"--resume: the recipe differs from the one the interrupted run started with "
                            f"({', '.join(changed)}); resume with the same recipe and --set values, or delete "
                            f"{staging} to start fresh")
        log.warning("resuming from %s", ckpt)
    elif ckpt is not None:
        # --overwrite does not discard hours of training silently: the user picks.
        raise UserError(f"an interrupted run of {out} left checkpoint {ckpt}; pass --resume to continue it, "
                        f"or delete {staging} to start fresh")
    return RunDir(out=out, staging=staging, resume_from=ckpt, takeover=overwrite or resume)


def _main_process() -> bool:
    return PartialState().is_main_process


def claim(rundir: RunDir, recipe: Recipe) -> None:
    """Create the staging directory (the main process), then every rank goes on together."""
    if _main_process() and rundir.resume_from is None:
        if rundir.staging.exists():  # no complete checkpoint in it (reserve checked): a failed start's leftovers
            shutil.rmtree(rundir.staging)
        try:
            rundir.staging.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"output_dir {rundir.out}: cannot create {rundir.staging} ({exc.strerror})") from None
        (rundir.staging / outputs.MARKER).write_text("an unfinished finetune run; see finetune/runs/staging.py\n")
        (rundir.staging / START_RECIPE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    PartialState().wait_for_everyone()


def discard(rundir: RunDir, exc: BaseException) -> None:
    """After a failure: remove the staging directory unless --resume could continue it."""
    if not rundir.staging.exists():
        return
    ckpt = None if isinstance(exc, CheckFailed) else newest_checkpoint(rundir.staging / "checkpoints")
    if ckpt is not None:
        for half in (rundir.staging / "checkpoints").glob("checkpoint-*"):
            if half.is_dir() and incomplete_reason(half) is not None:  # e.g. a save cut by a full disk
                shutil.rmtree(half, ignore_errors=True)
        if not isinstance(exc, signals.Interrupted):
            log.warning("the run failed; checkpoint %s is kept: fix the cause and continue with --resume, "
                        "or delete %s", ckpt, rundir.staging)
        return
    shutil.rmtree(rundir.staging, ignore_errors=True)


@contextmanager
def claimed(rundir: RunDir, recipe: Recipe):
    """Lock the output (main process), claim the staging directory; on any failure or interrupt keep
    only what --resume can continue (complete checkpoints), then release the lock."""
    held = (lock.acquire(rundir.out, "output_dir", rundir.takeover, "--resume or --overwrite")
            if _main_process() else None)
    try:
        claim(rundir, recipe)
        try:
            yield rundir
        except BaseException as exc:  # signals and Ctrl-C too: complete checkpoints stay, the rest goes
            if _main_process():
                discard(rundir, exc)
            raise
    finally:
        lock.release(held)


def finish(rundir: RunDir, recipe: Recipe, stage: str, parent_chain: list[dict], metrics: dict) -> None:
    """Run files into staging (chain.json last), swap into output_dir, drop checkpoints and resume files."""
    staging, out = rundir.staging, rundir.out
    adapter_sha = runs.sha256(staging / runs.ADAPTER_FILE)
    chain = runs.new_chain(out, stage, parent_chain, adapter_sha)
    runs.write_run_files(staging, out, recipe, chain, metrics)
    for name in (outputs.MARKER, START_RECIPE, *[p.name for p in staging.glob("routing_baseline_*.pt")]):
        (staging / name).unlink(missing_ok=True)
    # A signal here waits until the run is in place (signals.deferred), then ends the command.
    with signals.deferred(finished=str(out)):
        faults.point("swap")
        outputs.swap_into_place(staging, out)
        # After the swap: a kill here leaves a finished run with a spare checkpoints folder, never no run.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
