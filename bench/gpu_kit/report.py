"""Part `report`: read every part's JSON, check the schema, write report.json and results.md (the
Markdown rows for bench/RESULTS.md: device, versions, command, date, every figure).

    python bench/gpu_kit/kit.py report --out DIR --rc env=0 --rc bench=124 ... [--dry-run] [--command "..."]

`--rc` gives each part's exit status as the script saw it (124: killed by its timeout), so a part
that never wrote its file is reported as such, never silently left out.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpu_kit.common import ENVELOPE, SCHEMA, STATUSES, Part, now

DATA_KEYS = {
    "env": ["versions", "imported_from", "gpu", "matmul", "nvidia_smi"],
    "tests": ["pytest_command", "returncode", "tests", "counts"],
    "bench": ["shapes", "device", "peak_tflops", "rows", "targets"],
    "qlora": ["shapes", "build_s", "resident_gib", "predicted", "fast_layers", "tokens_per_s", "step_s_median", "mfu",
              "peak_gib", "fits_48gb"],
    "profile": ["fast_layers", "time_kind", "top", "grouped_gemm_share", "host_syncs", "host_sync_count", "table"],
}
ROW_KEYS = {
    "tests": ("tests", ["nodeid", "name", "outcome", "duration_s", "properties"]),
    "bench": ("rows", ["path", "mode", "tokens_per_s", "step_s_median", "step_s_all", "mfu", "peak_gib", "loss_finite"]),
    "profile": ("top", ["name", "calls", "self_ms", "share"]),
}


def check(doc, part: str) -> list[str]:
    """Schema problems of one part's document (an empty list when it is well formed)."""
    if not isinstance(doc, dict):
        return [f"{part}: not a JSON object"]
    problems = [f"{part}: missing key {k}" for k in ENVELOPE if k not in doc]
    if problems:
        return problems
    if doc["schema"] != SCHEMA or doc["part"] != part or doc["status"] not in STATUSES:
        problems.append(f"{part}: schema {doc['schema']}, part {doc['part']}, status {doc['status']}")
    if any(set(s) != {"name", "reason"} for s in doc["skipped"]):
        problems.append(f"{part}: every skipped entry needs exactly a name and a reason")
    if doc["status"] not in ("ok", "partial") and not doc["error"] and part != "tests":
        problems.append(f"{part}: status {doc['status']} without an error message")
    if doc["status"] == "ok":
        problems += [f"{part}: data lacks {k}" for k in DATA_KEYS[part] if k not in doc["data"]]
        if part in ROW_KEYS:
            key, need = ROW_KEYS[part]
            for i, row in enumerate(doc["data"].get(key, [])):
                if "error" not in row:
                    problems += [f"{part}: {key}[{i}] lacks {k}" for k in need if k not in row]
    return problems


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(docs: dict, parts: dict, command: str | None, dry_run: bool) -> str:
    env = docs.get("env", {}).get("data", {})
    v = env.get("versions", {})
    device = next((d["device"] for d in docs.values()), "?")
    kind = "DRY RUN: CPU, tiny shapes, not a GPU figure" if dry_run else "measured"
    smi = env.get("nvidia_smi") or {}
    lines = [f"## GPU proof kit: {device}, {now()[:10]} ({kind})", "",
             f"- command: `{command or 'bench/gpu_check.sh'}`",
             f"- versions: torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), transformers {v.get('transformers')}, "
             f"peft {v.get('peft')}, trl {v.get('trl')}, bitsandbytes {v.get('bitsandbytes')}, accelerate "
             f"{v.get('accelerate')}, datasets {v.get('datasets')}, Python {v.get('python')}; driver {smi.get('driver_version', '-')}",
             "- parts (status, wall seconds of the process): " + ", ".join(
                 f"{k} {p['status']}" + (f" ({p['wall_s']} s)" if p.get("wall_s") is not None else "") for k, p in parts.items())]
    if env.get("matmul"):
        m = env["matmul"]
        lines.append(f"- measured matrix-product rate: {m['tflops']:.3g} TFLOP/s ({m['n']}^3 {m['dtype']}, median of {m.get('reps')}); "
                     "MFU below is against the 989 TFLOP/s datasheet figure")
    b = docs.get("bench", {}).get("data", {})
    if b.get("rows"):
        s = b["shapes"]
        lines += ["", f"### {s['layers']} Mixtral layers (hidden {s['hidden']}, intermediate {s['intermediate']}, {s['experts']} "
                  f"experts top-{s['top_k']}, heads {s['heads']}/{s['kv_heads']}), {s['batch']} x {s['seq']} tokens, LoRA r={s['rank']}, "
                  f"{s['dtype']}, AdamW (median of {s['steps']} steps after {s['warmup']} warm-up)", "",
                  "| path | mode | tokens/s | step ms (median; min-max) | MFU % | peak GiB | vs attn-only | vs peft-grouped_mm |",
                  "|---|---|---|---|---|---|---|---|"]
        ref = {(r["path"], r["mode"]): r for r in b["rows"] if "error" not in r}
        for r in b["rows"]:
            if "error" in r:
                lines.append(f"| {r['path']} | {r['mode']} | {r['error']} | | | | | |")
                continue
            attn, stock = ref.get(("attn-only", r["mode"])), ref.get(("peft-grouped_mm", r["mode"]))
            lines.append(f"| {r['path']} | {r['mode']} | {r['tokens_per_s']:.0f} | {1e3 * r['step_s_median']:.1f}; "
                         f"{1e3 * r['step_s_min']:.1f}-{1e3 * r['step_s_max']:.1f} | {100 * r['mfu']:.2f} | {_f(r['peak_gib'])} | "
                         f"{_f(attn and r['tokens_per_s'] / attn['tokens_per_s'])}x | {_f(stock and r['tokens_per_s'] / stock['tokens_per_s'])}x |")
        lines += ["", "Targets (docs/gpu.md): " + "; ".join(
            f"{k} {_f(t['value'], '{:.3f}')} ({t['target']}: {'met' if t['met'] else 'not met' if t['met'] is False else '-'})"
            for k, t in b["targets"].items())]
    q = docs.get("qlora", {}).get("data", {})
    if "tokens_per_s" in q:
        s, pred = q["shapes"], q["predicted"].get("total_gib")
        lines += ["", f"### QLoRA: {s['layers']} layers (hidden {s['hidden']}, intermediate {s['intermediate']}), NF4 experts + Linear4bit attention, {s['batch']} x {s['seq']} tokens, "
                  f"r={s['rank']}, gradient checkpointing, AdamW", "",
                  "| tokens/s | step s (median) | MFU % | peak GiB | predicted GiB (bench/qlora_memory.py, computed) | within 48 GB | build s |",
                  "|---|---|---|---|---|---|---|",
                  f"| {q['tokens_per_s']:.0f} | {q['step_s_median']:.2f} | {100 * q['mfu']:.2f} | {_f(q['peak_gib'])} | {_f(pred)} | "
                  f"{'-' if q['fits_48gb'] is None else q['fits_48gb']} | {q['build_s']:.0f} |"]
    p = docs.get("profile", {}).get("data", {})
    if "top" in p:
        lines += ["", f"### One profiled fast-path SFT step ({p['time_kind']} time)", "",
                  f"Grouped GEMMs (aten::_grouped_mm): {100 * (p['grouped_gemm_share'] or 0):.1f}% of "
                  f"{p['total_self_ms']:.1f} ms; host syncs: {p['host_syncs'] or 'none'}"
                  + (" (on the CPU these are .item() reads, not device syncs)" if p["time_kind"].startswith("cpu") else ""), "",
                  "| kernel / op | calls | self ms | share |", "|---|---|---|---|"]
        lines += [f"| `{t['name'][:90]}` | {t['calls']} | {t['self_ms']:.2f} | {_f(t['share'] and 100 * t['share'], '{:.1f}')}% |"
                  for t in p["top"][:10]]
    t = docs.get("tests", {}).get("data", {})
    if t.get("tests"):
        lines += ["", f"### pytest -m gpu: {t['counts']}", "", "| test | outcome | s | figures or reason |", "|---|---|---|---|"]
        for r in t["tests"]:
            extra = r.get("reason") or r.get("message", "").splitlines()[-1:] or [""]
            extra = extra if isinstance(extra, str) else extra[0]
            props = ", ".join(f"{k}={_f(v, '{:.4g}') if isinstance(v, float) else v}" for k, v in r["properties"].items())
            lines.append(f"| {r['name']} | {r['outcome']} | {r['duration_s']:.1f} | {props or extra} |")
    return "\n".join(lines) + "\n"


def run(out, rcs: dict[str, int], dry_run: bool, command: str | None = None, walls: dict | None = None) -> list[str]:
    out = Path(out)
    part = Part("report", out, dry_run)
    docs, parts, problems = {}, {}, []
    for name, rc in rcs.items():
        path = out / f"{name}.json"
        if not path.exists():
            why = "timeout" if rc in (124, 137) else "failed"
            parts[name] = {"status": why, "rc": rc, "file": None}
            problems.append(f"{name}: no {path.name} (exit status {rc})")
            continue
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"{name}: {path.name} is not JSON ({exc})")
            continue
        problems += check(doc, name)
        docs[name] = doc
        status = doc["status"] if rc == 0 or doc["status"] != "ok" else "failed"
        if rc in (124, 137):
            status = "timeout"
        parts[name] = {"status": status, "rc": rc, "file": path.name, "seconds": doc.get("seconds"), "error": doc.get("error")}
    for name, wall in (walls or {}).items():
        if name in parts:
            parts[name]["wall_s"] = wall  # the whole process, imports included (the script's clock)
    part.data.update(parts=parts, schema_problems=problems)
    md = markdown(docs, parts, command, dry_run)
    (out / "results.md").write_text(md)
    print(md, flush=True)
    for p in problems:
        print(f"report: {p}", flush=True)
    failed = [k for k, p in parts.items() if p["status"] != "ok"]
    part.error = f"parts not ok: {failed}" if failed else None
    part.write("failed" if problems or failed else "ok")
    return problems
