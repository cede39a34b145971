"""Output safety: where a run or an export may write, and the write-beside-and-swap that puts it there.

    finetune sft RECIPE [--overwrite] [--resume]      # runs: check_destination(..., "run", ...)
    finetune export RUN --output DIR [--overwrite]    # exports: check_destination(..., "export", ...)

Every check here reads the disk and changes nothing, so it runs before a stage creates or deletes
anything. `--overwrite` replaces only what this project wrote and recognises: a finished run
(chain.json + recipe.yaml), an interrupted run of ours (the marker file), an export (export.json;
running an export again replaces the previous one without the flag, as it always has).
It never replaces the current directory, the base model, the parent run, the run being
exported, the recipe's data directories, any ancestor of those, nor a foreign non-empty
directory; a run inside the model directory or inside another run, and an export inside a run,
are refused. All paths are compared after resolve(), so symlinks cannot sneak past.

A run trains into a staging sibling `<parent>/.<name>.incomplete/` (deterministic, so
`--resume` finds it) and is renamed into place only when finished (`swap_into_place`); the old
finished run is moved aside and removed only after that rename.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from finetune.errors import UserError

MARKER = ".finetune-run"
"""Written first into every staging directory: what lets --overwrite recognise an interrupted run of ours."""


def staging_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.incomplete"


def is_finished_run(path: Path) -> bool:
    return (path / "chain.json").is_file() and (path / "recipe.yaml").is_file()


def is_export(path: Path) -> bool:
    return (path / "export.json").is_file()


def _ours(path: Path, kind: str) -> bool:
    if kind == "run":
        return is_finished_run(path) or (path / MARKER).is_file()
    return is_export(path)


def _inside(path: Path, other: Path) -> bool:
    """path is other or lies below it."""
    return path == other or other in path.parents


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor must be a writable directory (no file in the way)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a directory; choose another {what}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{what} {path}: cannot write in {parent} (permission denied); choose another {what}")
            return


def check_destination(path: str | Path, kind: str, overwrite: bool, protected: dict[str, str | Path] = (),
                      what: str = "output_dir") -> Path:
    """The resolved destination, or a UserError saying why it may not be written and what to do.

    kind: "run" or "export" (what --overwrite may replace there). protected: label -> path that
    the destination may neither be, nor contain (e.g. {"the base model": ..., "the parent run": ...});
    labels starting with "data" only guard the directory itself and its ancestors.
    """
    out = Path(path).resolve()
    cwd = Path.cwd().resolve()
    fix = f"choose another {what}" + (" (--set output_dir=...)" if what == "output_dir" else "")
    if _inside(cwd, out):
        raise UserError(f"{what} {out} is the current directory or one of its ancestors; --overwrite never "
                        f"replaces it; {fix}")
    for label, p in dict(protected).items():
        if not p:
            continue
        p = Path(p).resolve()
        if _inside(p, out):
            rel = "is" if p == out else "contains"
            raise UserError(f"{what} {out} {rel} {label} ({p}); it is never replaced; {fix}")
        if not label.startswith("data") and p.is_dir() and p in out.parents:
            raise UserError(f"{what} {out} lies inside {label} ({p}); write it elsewhere, e.g. next to it; {fix}")
    for parent in out.parents:
        if is_finished_run(parent) or is_export(parent):
            kind_of = "run" if is_finished_run(parent) else "export"
            raise UserError(f"{what} {out} lies inside the {kind_of} {parent}; {fix}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file, not a directory; {fix}")
    _writable_parent(out, what)
    if out.is_dir() and any(out.iterdir()):
        if not _ours(out, kind):
            raise UserError(f"{what} {out} holds files that are not a {'run' if kind == 'run' else 'previous export'} "
                            f"of this project; --overwrite never replaces them; {fix}")
        # Re-running an export replaces the previous one (as it always did); a run needs --overwrite.
        if not overwrite and kind == "run":
            raise UserError(f"{what} {out} already holds a finished {kind}; {fix} or pass --overwrite to replace it "
                            f"(it stays intact until the new one has finished)")
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise UserError(f"{what} {out}: cannot replace it, {out.parent} is not writable; {fix}")
    return out


def swap_into_place(new: Path, output: Path) -> None:
    """Rename new to output; an existing output is moved aside first and removed after the rename."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    new.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
