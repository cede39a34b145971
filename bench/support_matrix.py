"""The MoE support matrix: every model type transformers ships with fused 3-D experts, end to end
on a tiny random checkpoint: validate, SFT, DPO, export, reload, experts changed, routing metrics,
router policies. Writes docs/support-matrix.md (rows of types not run are kept from the file).

    OMP_NUM_THREADS=1 python bench/support_matrix.py              # every type (long on 2 CPU cores)
    OMP_NUM_THREADS=1 python bench/support_matrix.py --curated    # the set the slow CI test regenerates
    python bench/support_matrix.py --types qwen2_moe gpt_oss --out /tmp/m.md
The type list and each tiny config are computed (bench/tiny_configs.py), not hand-written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import matrix_fastpath
import tiny_configs
import tiny_models
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM

from finetune import runs
from finetune.export import export
from finetune.load import chain
from finetune.moe import experts_modules, find_routers, structure
from finetune.recipe import read_recipe
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft
from finetune.validate import check

DATA = REPO / "data" / "tiny-tasks"
MATRIX = REPO / "docs" / "support-matrix.md"
CURATED = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_next", "olmoe", "deepseek_v3", "gpt_oss",
           "glm4_moe", "granitemoe", "phimoe", "llama4", "gemma4"]
COLUMNS = ["validate", "sft", "dpo", "export", "reload", "experts changed", "routing metrics", "router policies"]
COLUMNS += matrix_fastpath.COLUMNS  # fast expert path and 4-bit experts (issue 20): bench/matrix_fastpath.py
IDS = torch.tensor([[1, 9, 4, 17, 22, 30, 5, 2, 40, 41, 42, 43]])
# float32 end to end: the export and the unmerged chain differ only by summation order
LOGITS_ATOL = 1e-4


class Failed(Exception):
    """A check failed; the message is the matrix cell."""


def recipe(tmp: Path, model: Path, stage: str, policy: str = "freeze", steps: int = 3) -> Path:
    raw = {
        "output_dir": str(tmp / f"{stage}-{policy}"), "seed": 0,
        "data": {"train": [str(DATA / ("sft.jsonl" if stage == "sft" else "preference.jsonl"))], "max_length": 224},
        "lora": {"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
        "router": {"policy": policy},
        stage: {"learning_rate": 5e-2, "max_steps": steps, "per_device_train_batch_size": 8 if stage == "sft" else 2, "logging_steps": 1,
                "save_strategy": "no", "report_to": "none"},
    }
    if stage == "sft":
        raw["model"] = {"name_or_path": str(model), "dtype": "float32", "attn_implementation": "eager"}
    else:
        raw["from_run"] = str(tmp / "sft-freeze")
    path = tmp / f"{stage}-{policy}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def expert_weights(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{w}": getattr(m, w).detach() for n, m in model.named_modules() if m in experts_modules(model)
            for w in ("gate_up_proj", "up_proj", "down_proj") if isinstance(getattr(m, w, None), torch.nn.Parameter)}


def run_type(model_type: str, tmp: Path) -> dict[str, str]:
    cells: dict[str, str] = {}
    built, how = tiny_configs.text_model_type(model_type)
    if built is None:
        return {c: how for c in COLUMNS} | {"_note": how}
    cells["_note"] = how
    model_dir, seed = tiny_models.tiny_checkpoint(built, tmp / "base")
    if seed:
        cells["_note"] = f"{how or 'text'}, seed {seed}"

    def step(column, fn):
        if any(not v.startswith("pass") for k, v in cells.items() if not k.startswith("_")):
            cells[column] = "skipped (earlier check failed)"
            return None
        try:
            out = fn()
            cells[column] = "pass" + (f" ({out})" if isinstance(out, str) else "")
            return out
        except Failed as exc:
            cells[column] = str(exc)
        except Exception as exc:  # noqa: BLE001  # the matrix records any crash as the cell's reason
            problems = getattr(exc, "problems", None)
            text = "; ".join(map(str, problems)) if problems else (str(exc).splitlines()[0] if str(exc) else "")
            cells[column] = f"{type(exc).__name__}: {text[:300]}"
            logging.getLogger("support_matrix").debug("%s", traceback.format_exc())
        return None

    sft_recipe = recipe(tmp, model_dir, "sft")
    checked = step("validate", lambda: check(read_recipe(sft_recipe)))
    if checked is not None:
        cells["validate"] = "pass (" + ", ".join(checked.targets.groups) + f"; {sum(checked.trainable.values()):,} trainable)"
    sft_run = step("sft", lambda: run_sft(read_recipe(sft_recipe)))
    dpo_run = step("dpo", lambda: run_dpo(read_recipe(recipe(tmp, model_dir, "dpo"))))
    out = step("export", lambda: export(str(dpo_run), str(tmp / "export"), dtype="float32", progress=False))

    def reload():
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        unmerged = chain.load_chain(runs.read_run(dpo_run), dtype="float32", keep_last=True).eval()
        diff = (logits(exported) - logits(unmerged)).abs().max().item()
        if diff > LOGITS_ATOL:
            raise Failed(f"export logits differ from the unmerged chain by {diff:.2e}")
        return f"max diff {diff:.1e}"

    step("reload", reload)

    def changed():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        before, after = expert_weights(base), expert_weights(exported)
        if not before:
            raise Failed("no fused expert weights found")
        same = [f"{k}[{e}]" for k in before for e in range(before[k].shape[0]) if torch.equal(before[k][e], after[k][e])]
        if same:
            raise Failed(f"{len(same)} expert weights unchanged, e.g. {same[0]}")
        shared = [p for lp in structure(base) for p in lp.shared]
        base_sd, out_sd = base.state_dict(), exported.state_dict()
        unchanged_shared = [k for k in base_sd if any(f".{s}." in f".{k}" for s in shared)
                            and k.endswith("weight") and torch.equal(base_sd[k], out_sd[k])]
        if unchanged_shared:
            raise Failed(f"shared expert weight unchanged: {unchanged_shared[0]}")
        layers = sum(lp.moe for lp in structure(base))
        return f"{layers} MoE layers" + (", shared experts too" if shared else "")

    step("experts changed", changed)

    def routing():
        history = runs.read_run(sft_run).metrics["log_history"]
        keys = {k for entry in history for k in entry if k.startswith("routing/")}
        if not any(k.endswith("entropy_mean") for k in keys):
            raise Failed("no routing/* metrics in the SFT log")

    step("routing metrics", routing)

    def policies():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        names = [r.name + "." + r.weight_name for r in find_routers(base)]
        for policy in ("train", "lora"):
            run = run_sft(read_recipe(recipe(tmp, model_dir, "sft", policy, steps=2)))
            if not runs.read_run(run).metrics["trainable_parameters"].get("router"):
                raise Failed(f"policy {policy}: no router parameter trained")
            merged = export(str(run), str(tmp / f"export-{policy}"), dtype="float32", progress=False)
            after = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
            if all(torch.equal(base.state_dict()[n], after[n]) for n in names):
                raise Failed(f"policy {policy}: the exported router is unchanged")

    step("router policies", policies)
    cells.update(matrix_fastpath.cells(model_dir))  # run whatever the columns above found
    return cells


def read_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("| `"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows[cells[0].strip("`")] = cells[1:]
    return rows


def row_cells(cells: dict[str, str]) -> list[str]:
    def clean(text: str) -> str:  # the same row on every machine: no temporary paths, no table breaks
        return re.sub(r"/tmp/tmp[\w]+", "<tmp>", text).replace("|", "/")

    return [cells.get("_note", "") or "text"] + [clean(cells[c]) for c in COLUMNS]


def write_matrix(path: Path, rows: dict[str, list[str]], all_types: dict[str, str], seconds: dict[str, float]) -> int:
    text_types = [t for t in all_types if tiny_configs.is_text_type(t)]
    passing = [t for t in text_types if t in rows and all(c.startswith("pass") for c in rows[t][1:])]
    lines = [
        "# Mixture-of-Experts support matrix",
        "",
        (f"transformers {transformers.__version__}: **{len(passing)} of {len(text_types)} text model types pass every column** "
        f"({len(all_types)} types with fused 3-D experts, found by scanning transformers/models/*/modeling_*.py and "
        "the auto mappings; a text model type has a causal LM of its own or through its text model; "
        f"{len(rows)} run). Generated by `python bench/support_matrix.py` (docs: this page is its output; "
        "tests/e2e/test_family_sweep.py regenerates the curated rows and compares)."),
        "",
        ("Each type runs on a tiny random checkpoint derived from its config class (bench/tiny_configs.py: "
        "few layers and experts, small sizes, the bundled tokenizer's vocabulary; shared experts, dense first "
        "layers, MLA, biases, sinks and sliding windows kept; its vocabulary covers every id its tokenizer makes; "
        f"the seed is the first of {tiny_models.SEEDS.start}..{tiny_models.SEEDS.stop - 1} whose random routers send every "
        f"expert at least {tiny_models.MIN_SHARE:g} of an even share of the SFT data's tokens, named in `built as` when not 0). Columns: `finetune validate` (groups, trainable "
        "count); SFT 3 steps; DPO 3 steps on that run; export with its verification; the export reloaded in plain "
        "transformers, logits equal to the unmerged chain (float32, atol 1e-4); every expert of every MoE layer "
        "changed by the export (and every shared expert); routing metrics in the SFT log; router policies train "
        "and lora each train the router and the export carries it (freeze is the SFT column)."),
        "",
        ("Last two columns (bench/matrix_fastpath.py, run even where an earlier column failed): the fast expert "
        "LoRA path against PEFT's stock path on one forward and backward (logits and every gradient, float32, "
        "rtol 1e-4), or the reason it names for leaving experts on the stock path; and finetune's 4-bit load "
        "leaving every MoE layer's experts in NF4, quantized as the checkpoint streams in."),
        "",
        "| type | built as | " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    for t in sorted(rows):
        lines.append(f"| `{t}` | " + " | ".join(rows[t]) + " |")
    not_run = [t for t in all_types if t not in rows]
    if not_run:
        lines += ["", "Not run yet (the full sweep did not fit the first session's time on the shared 2-core "
                  "machine; run `python bench/support_matrix.py` to fill these rows): " + ", ".join(f"`{t}`" for t in not_run) + "."]
    if seconds:
        lines += ["", "Seconds per type in the script's last invocation (2-core CPU, shared, OMP_NUM_THREADS=1): "
                  + ", ".join(f"{t} {s:.0f}" for t, s in sorted(seconds.items())) + "."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return len(passing)


class OverTime(Exception):
    """A type ran past --max-seconds (the check it was in gets this as its cell)."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise OverTime inside whatever check runs when `seconds` have passed (SIGALRM; 0: no limit)."""
    def stop(*_):
        raise OverTime(f"not finished within {seconds} s on a shared 2-core CPU (--max-seconds)")

    previous = signal.signal(signal.SIGALRM, stop) if seconds else None
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        if previous is not None:
            signal.signal(signal.SIGALRM, previous)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*")
    parser.add_argument("--curated", action="store_true")
    parser.add_argument("--out", default=str(MATRIX))
    parser.add_argument("--only-fastpath", action="store_true",
                        help="refill only the fast-path and 4-bit columns of rows already in --out (bench/matrix_fastpath.py)")
    parser.add_argument("--max-seconds", type=int, default=0,
                        help="stop a type's checks after this long; its cell says so (0: no limit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if "SUPPORT_MATRIX_DEBUG" in __import__("os").environ else logging.WARNING)
    all_types = tiny_configs.fused_expert_types()
    wanted = args.types or ([t for t in CURATED if t in all_types] if args.curated else list(all_types))
    out = Path(args.out)
    rows = read_rows(out)
    seconds = {}
    started = time.perf_counter()
    for model_type in wanted:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), time_limit(args.max_seconds):
            try:
                cells = matrix_fastpath.refill(model_type, Path(tmp), rows.get(model_type), COLUMNS) \
                    if args.only_fastpath else run_type(model_type, Path(tmp))
            except Exception as exc:  # noqa: BLE001  # building the tiny checkpoint itself failed
                cells = {c: f"tiny checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}" for c in COLUMNS}
        seconds[model_type] = time.perf_counter() - t0
        rows[model_type] = row_cells(cells)
        print(json.dumps({"type": model_type, "seconds": round(seconds[model_type]), **cells}), flush=True)
        write_matrix(out, rows, all_types, seconds)
    passing = write_matrix(out, rows, all_types, seconds)
    print(f"{passing} text types pass every column; {time.perf_counter() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
