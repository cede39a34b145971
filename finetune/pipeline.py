"""The whole job in one command: SFT -> DPO -> export -> eval, with a before/after table (passkey retrieval included).

    finetune pipeline recipes/tiny-moe --eval-data data/tiny-tasks/test.jsonl

Reads <dir>/sft.yaml and <dir>/dpo.yaml, points the DPO recipe at the SFT run it just made,
exports the DPO chain, and scores the base model, the SFT run, the DPO run and the exported
checkpoint on the same data and on a small passkey grid (pipeline_lengths; files under
<dpo output_dir>/passkey/<stage>/). Writes <dpo output_dir>/pipeline.json with every figure and timing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from finetune.chain import load_for_inference
from finetune.errors import UserError
from finetune.eval import passkey, report
from finetune.eval.scores import evaluate
from finetune.export import export
from finetune.recipe import read_recipe
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft

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


def run_pipeline(recipe_dir: str, eval_data: list[str], export_dir: str | None = None,
                 export_dtype: str = "float32", overrides: list[str] = (), overwrite: bool = False,
                 with_passkey: bool = True) -> dict:
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
    export_dir = export_dir or str(Path("exports") / directory.name)
    timings, t0 = {}, time.perf_counter()

    sft_run = run_sft(sft_recipe, overwrite=overwrite)
    timings["sft"] = time.perf_counter() - t0
    dpo_run = run_dpo(dpo_recipe, overwrite=overwrite)
    timings["dpo"] = time.perf_counter() - t0 - sum(timings.values())
    exported = export(str(dpo_run), export_dir, dtype=export_dtype, overwrite=overwrite)
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
    out = []
    for length in grid["lengths"]:
        cells = [c for c in grid["cells"] if c["length"] == length]
        if cells[0]["status"] != "ok":
            out.append("beyond")
        else:
            out.append(f"{sum(c['accuracy'] for c in cells) / len(cells):.2f}")
    return out
