"""The whole job in one command: SFT -> DPO -> export -> eval, with a before/after table (passkey retrieval included).

    finetune pipeline recipes/tiny-moe --eval-data data/tiny-tasks/test.jsonl [--resume]

Reads <dir>/sft.yaml and <dir>/dpo.yaml, points the DPO recipe at the SFT run it just made,
exports the DPO chain, and scores the base model, the SFT run, the DPO run and the exported
checkpoint on the same data and on a small passkey grid (pipeline_lengths; files under
<dpo output_dir>/passkey/<stage>/). Writes <dpo output_dir>/pipeline.json with every figure and timing.

--resume continues an interrupted pipeline: a stage whose finished run is at its output_dir and
was trained from the same resolved recipe is kept (its adapters checked against their sha256),
an interrupted one continues from its newest checkpoint (as `finetune sft/dpo --resume`), and
the rest runs; a finished run of a different recipe is an error, never retrained silently. DPO
is kept only if SFT was, and the export only if DPO was and the export is of that run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from finetune.errors import UserError
from finetune.eval import passkey, report
from finetune.eval.scores import evaluate
from finetune.export import export
from finetune.load.chain import load_for_inference
from finetune.recipe import read_recipe, recipe_to_dict
from finetune.runs import check_adapter_hashes, outputs, read_run, staging
from finetune.runs.resume import newest_checkpoint
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft
from finetune.validate.resolve import resolved_recipe

log = logging.getLogger("finetune")


def pipeline_lengths(context: int | None) -> list[int]:
    """A small passkey grid that fits any model: 1/4, 1/2, 3/4 of the context, the longest prompt that fits, and 2x (beyond)."""
    if not context:
        return [1024, 2048, 4096]
    return [context // 4, context // 2, 3 * context // 4, context - 16, 2 * context]


PIPELINE_DEPTHS = [0.0, 0.5, 1.0]
PIPELINE_TRIALS = 4


def _score(name: str, data: list[str], passkey_dir: Path | None) -> tuple[dict, dict | None]:
    model, tokenizer = load_for_inference(name)
    scores = evaluate(model, tokenizer, data)
    grid = None
    if passkey_dir is not None:
        grid = passkey.passkey_grid(model, tokenizer, pipeline_lengths(passkey.context_of(model)), PIPELINE_DEPTHS,
                                    trials=PIPELINE_TRIALS, seed=0)
        report.write_passkey(grid, passkey_dir, name)
    return scores, grid


def kept_run(recipe, stage: str) -> Path | None:
    """--resume: the finished run at the recipe's output_dir if it was trained from this recipe,
    None if there is none; a UserError if it was trained from another one."""
    out = Path(recipe.output_dir).resolve()
    if not outputs.is_finished_run(out):
        return None
    want = recipe_to_dict(resolved_recipe(recipe, stage)[1])
    try:
        have = yaml.safe_load((out / "recipe.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{out / 'recipe.yaml'}: not valid YAML ({exc}); pass --overwrite to train {out} again") from None
    for recipe_dict, base in ((have, out), (want, Path.cwd())):  # stored relative to the run; given relative to cwd
        if recipe_dict.get("from_run"):
            recipe_dict["from_run"] = str((base / recipe_dict["from_run"]).resolve())
    changed = [k for k in staging.changed_keys(have, want) if k != "output_dir"]
    if changed:
        raise UserError(f"--resume: {out} is a finished {stage} run of another recipe ({', '.join(changed)}); "
                        "restore the recipe, or pass --overwrite to train it again")
    check_adapter_hashes(read_run(out))
    return out


def run_pipeline(recipe_dir: str, eval_data: list[str], export_dir: str | None = None,
                 export_dtype: str = "float32", overrides: list[str] = (), overwrite: bool = False,
                 with_passkey: bool = True, resume: bool = False) -> dict:
    directory = Path(recipe_dir)
    sft_path, dpo_path = directory / "sft.yaml", directory / "dpo.yaml"
    missing = [str(p) for p in (sft_path, dpo_path) if not p.is_file()]
    if missing:
        raise UserError(f"{recipe_dir}: a pipeline directory holds sft.yaml and dpo.yaml; missing {', '.join(missing)}")
    for path in eval_data:
        if not Path(path).is_file():
            raise UserError(f"--eval-data {path}: file not found")
    sft_recipe = read_recipe(sft_path, overrides)
    dpo_recipe = read_recipe(dpo_path, [f"from_run={sft_recipe.output_dir}"])
    if dpo_recipe.from_model:
        raise UserError(f"{dpo_path}: from_model `{dpo_recipe.from_model}`: the pipeline trains DPO on the SFT run it "
                        f"has just made; remove from_model, or train on that model alone with `finetune dpo {dpo_path}`")
    export_dir = export_dir or str(Path("exports") / directory.name)
    timings, t0 = {}, time.perf_counter()

    def stage(run_fn, recipe, name: str, may_keep: bool) -> tuple[Path, bool]:
        """The stage's run and whether it was (re)trained now."""
        if resume:
            kept = kept_run(recipe, name) if may_keep else None
            if kept is not None:
                log.warning("--resume: keeping the finished %s run %s", name, kept)
                return kept, False
            if newest_checkpoint(staging.staging_for(recipe) / "checkpoints") is not None:
                return Path(run_fn(recipe, resume=True)).resolve(), True
        return Path(run_fn(recipe, overwrite=overwrite)).resolve(), True

    sft_run, sft_trained = stage(run_sft, sft_recipe, "sft", may_keep=True)
    timings["sft"] = time.perf_counter() - t0
    dpo_run, dpo_trained = stage(run_dpo, dpo_recipe, "dpo", may_keep=not sft_trained)
    timings["dpo"] = time.perf_counter() - t0 - sum(timings.values())
    previous = _export_of(Path(export_dir))
    if resume and not dpo_trained and previous == str(dpo_run):
        log.warning("--resume: keeping the export %s of %s", export_dir, dpo_run)
        exported = Path(export_dir).resolve()
    else:  # --resume replaces an export of this pipeline's DPO run: derived from the run it continues
        exported = export(str(dpo_run), export_dir, dtype=export_dtype,
                          overwrite=overwrite or (resume and previous == str(dpo_run)),
                          progress=logging.getLogger("finetune").isEnabledFor(logging.INFO))  # not under --quiet
    timings["export"] = time.perf_counter() - t0 - sum(timings.values())

    scored, passkeys = {}, {}
    for label, name in (("base", sft_recipe.model.name_or_path), ("sft", str(sft_run)), ("dpo", str(dpo_run)), ("export", str(exported))):
        log.info("evaluating %s (%s)", label, name)
        scored[label], grid = _score(name, eval_data, Path(dpo_run) / "passkey" / label if with_passkey else None)
        if grid is not None:
            passkeys[label] = grid
    timings["eval"] = time.perf_counter() - t0 - sum(timings.values())
    timings["total"] = time.perf_counter() - t0

    summary = {"runs": {"sft": str(sft_run), "dpo": str(dpo_run), "export": str(exported)},
               "results": scored, "passkey": passkeys, "seconds": timings}
    (Path(dpo_run) / "pipeline.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


def _export_of(path: Path) -> str | None:
    """The run an earlier export at path was made from (its export.json), else None."""
    try:
        return str(Path(json.loads((path / "export.json").read_text())["run"]).resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_summary(summary: dict) -> str:
    results = summary["results"]
    files = list(next(iter(results.values())))
    metric_of = {f: next(m for m in ("exact_match", "preference_accuracy", "loss") if m in results["base"][f]) for f in files}
    passkeys = summary.get("passkey") or {}
    head = f"{'':<10}" + "".join(f"{Path(f).stem + ' ' + metric_of[f]:>30}" for f in files)
    if passkeys:
        head += f"{'passkey (in context)':>22}"
    lines = ["", "pipeline results", head]
    for label, per_file in results.items():
        line = f"{label:<10}" + "".join(f"{per_file[f][metric_of[f]]:>30.4f}" for f in files)
        if label in passkeys:
            accuracy = passkeys[label]["accuracy"]
            line += f"{'n/a' if accuracy is None else f'{accuracy:.4f}':>22}"
        lines.append(line)
    if passkeys:
        some = next(iter(passkeys.values()))
        by_length = ", ".join(f"{label}: " + " ".join(_by_length(grid)) for label, grid in passkeys.items())
        lines.append(f"passkey by length {some['lengths']} (depths {some['depths']}, {some['trials']} trials): {by_length}")
        lines.append(f"passkey reports (JSON, Markdown, heat-map): {Path(summary['runs']['dpo']) / 'passkey'}/<stage>/")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    lines.append(f"exported checkpoint: {summary['runs']['export']}")
    return "\n".join(lines)


def _by_length(grid: dict) -> list[str]:
    return ["beyond" if accuracy is None else f"{accuracy:.2f}" for accuracy in passkey.accuracy_by_length(grid).values()]
