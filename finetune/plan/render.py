"""`finetune plan` on the command line: read and validate the recipe, plan, print a table or JSON.

    finetune plan recipes/mixtral-8x7b/sft.yaml --gpu h100-80gb --gpus 8 [--json]
"""

from __future__ import annotations

import json

from finetune.data.sources import count_rows
from finetune.errors import UserError
from finetune.plan import hardware, plan
from finetune.plan.launch import read_launch


def _rows(recipe) -> int | None:
    counts = [count_rows(s) for s in recipe.data.train]
    return None if not counts or None in counts else sum(counts)


def check_args(args) -> hardware.Gpu:
    """The GPU and counts of the command line, before the recipe is read (bad ones exit 2)."""
    gpu = hardware.pick_gpu(args.gpu, args.gpu_memory)
    args.launched = None
    if args.launch:
        args.launched, gpus, nodes = read_launch(args.launch)
        args.gpus = args.gpus if args.gpus is not None else gpus
        args.nodes = args.nodes if args.nodes is not None else nodes
    args.gpus = 1 if args.gpus is None else args.gpus
    args.nodes = 1 if args.nodes is None else args.nodes
    if args.gpus < 1 or args.nodes < 1:
        raise UserError(f"--gpus and --nodes must be at least 1, got --gpus {args.gpus} --nodes {args.nodes}")
    return gpu


def plan_cli(args, checked, gpu: hardware.Gpu) -> int:
    """Print the plan of a validated recipe (finetune/cli/ validates it: validate is a sibling layer)."""
    rows = args.rows or _rows(checked.recipe)
    result = plan(checked, gpu, args.gpus, args.nodes, nf4=True if args.nf4 else None, rows=rows)
    result["overrides"] = list(args.overrides)
    if args.launched:
        row = next((r for r in result["strategies"] if r["strategy"] == args.launched), None)
        result["launch"] = {"config": args.launch, "strategy": args.launched,
                            "fits": bool(row and row["fits"]), "largest_micro_batch": row["largest_micro_batch"] if row else 0}
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


def _gib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s" if seconds < 3600 else f"{seconds / 3600:.3g} h"


def text(r: dict) -> str:
    p = r["params"]
    lines = [
        f"{r['recipe']} ({r['stage']}): {r['model']}",
        f"  {r['gpus']} x {r['gpu']} ({r['gpu_memory_gib']:.1f} GiB) x {r['nodes']} node(s); "
        f"max_length {r['max_length']}, micro-batch {r['micro_batch']}, accumulation {r['gradient_accumulation']}, "
        f"global batch {r['global_batch']}; checkpointing {'on' if r['gradient_checkpointing'] else 'off'}; "
        f"attention {r['attention']}{'; 4-bit base' if r['nf4'] else ''}",
        f"  params {p['total'] / 1e9:.2f}B ({p['experts'] / 1e9:.2f}B in experts), active per token "
        f"{p['active_per_token'] / 1e9:.2f}B; LoRA {p['lora'] / 1e6:.1f}M ("
        + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p["lora_by_group"].items()) + ")",
        "",
        f"  at micro-batch {r['micro_batch']}:",
        f"  {'strategy':<18}{'fits':<6}{'peak GiB':>10}{'headroom':>10}{'max micro-batch':>17}  note",
    ]
    for row in r["strategies"]:
        fits = "-" if row["headroom_gib"] is None else ("yes" if row["fits"] else "no")
        lines.append(f"  {row['strategy']:<18}{fits:<6}{_gib(row['peak_gib'] or None):>10}{_gib(row['headroom_gib']):>10}"
                     f"{row['largest_micro_batch']:>17}  {row['note']}")
    rec = r["recommended"]
    lines.append("")
    if r.get("launch"):
        la = r["launch"]
        verdict = "fits" if la["fits"] else (f"fits at micro-batch {la['largest_micro_batch']}" if la["largest_micro_batch"]
                                              else "does not fit at any micro-batch")
        lines.append(f"  --launch {la['config']}: {la['strategy']} {verdict}")
    if rec is None:
        lines.append("  nothing fits at micro-batch 1: use a 4-bit base (model.quantization: nf4), more GPUs, "
                     "gradient checkpointing, or a shorter data.max_length")
        return "\n".join(lines)
    world = r["gpus"] * r["nodes"]
    launch = (f"accelerate launch --config_file {rec['config']} --num_processes {world} -m finetune"
              if rec["config"] else "finetune")
    lines.append(f"  use: {rec['strategy']}, micro-batch {rec['micro_batch']}, gradient accumulation "
                 f"{rec['gradient_accumulation']} (global batch {rec['global_batch']})")
    given = "".join(f" --set {o}" for o in r.get("overrides", []))
    lines.append(f"       {launch} {r['stage']} {r['recipe']}{given} --set {r['stage']}.per_device_train_batch_size={rec['micro_batch']} "
                 f"--set {r['stage']}.gradient_accumulation_steps={rec['gradient_accumulation']}")
    if rec["strategy"] == "ZeRO-3 + offload" and not r["nf4"]:
        lines.append(f"  or:  a 4-bit base on one GPU (model.quantization: nf4): finetune plan {r['recipe']} --nf4")
    big = next(row for row in r["strategies"] if row["strategy"] == rec["strategy"])
    lines.append("  peak of that row at the recipe's micro-batch: " + ", ".join(f"{k} {v:.2f}" for k, v in big["parts_gib"].items()) + " GiB")
    if rec.get("step_seconds") is not None:
        job = (f", job {_duration(rec['job_hours'] * 3600)} ({rec['steps']} steps)" if rec.get("steps")
               else f" ({rec.get('time_note')})")
        lines.append(f"  time: {_duration(rec['step_seconds'])} per optimizer step at {rec['utilisation']}{job}")
    else:
        lines.append(f"  time: {rec.get('time_note')}")
    return "\n".join(lines)
