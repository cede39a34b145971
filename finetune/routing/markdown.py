"""Render the routing report's dict (report.py) as routing.md: the tables a person reads first.

Called by `routing_report`; `finetune routing ... --output DIR` writes DIR/routing.md.
"""

from __future__ import annotations


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _signed_pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pt"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _repeat_section(result: dict) -> list[str]:
    sources = result["sources"]
    names = list(sources)
    depths = list(result["baselines"])
    labels = {"first_choice": "first", "first_or_second": "1st or 2nd"}
    header = ["layer"] + [f"{n}: {labels.get(d, d.replace('_', ' '))}" for n in names for d in depths]
    rows = []
    for i, layer in enumerate(result["model"]["layers"]):
        row = [str(layer)]
        for n in names:
            stats = sources[n]["layers"][i]
            for d in depths:
                cell = _pct(stats["repeat"][d])
                if d == "first_choice":
                    cell += f" ({_pct(stats['first_choice_load_baseline'])})"
                row.append(cell)
        rows.append(row)
    rows.append(["random"] + [_pct(result["baselines"][d]) for _ in names for d in depths])
    e, k = result["model"]["num_experts"], result["model"]["top_k"]
    return [
        "## Repeated expert assignments of consecutive tokens",
        "",
        "Share of consecutive token pairs (same sequence, no padding) whose first choice is the same "
        "expert (*first*), or whose first two choices share an expert (*1st or 2nd*, the Mixtral "
        "paper's \"first or second choice\"). In parentheses: the first-choice rate the layer's load "
        f"alone would give (sum of squared first-choice shares). Random routing ({e} experts, top-{k}): "
        "1 - C(E-m, m)/C(E, m) for the first m choices.",
        "",
        *_table(header, rows),
        "",
    ]


def _balance_section(result: dict) -> list[str]:
    sources = result["sources"]
    header = ["layer"]
    for n in sources:
        header += [f"{n}: max/mean", f"{n}: CV", f"{n}: entropy", f"{n}: dead"]
    rows = []
    for i, layer in enumerate(result["model"]["layers"]):
        row = [str(layer)]
        for n in sources:
            s = sources[n]["layers"][i]
            dead = ",".join(map(str, s["dead_experts"])) or "0"
            row += [_num(s["imbalance"], 2), _num(s["cv"], 2), _num(s["entropy"], 3), dead]
        rows.append(row)
    return [
        "## Load balance per layer",
        "",
        "max/mean: the busiest expert's share over the mean share (1 = balanced). CV: std/mean of the "
        "shares. Entropy: mean router entropy in nats (uniform = ln E). Dead: experts that got no token.",
        "",
        *_table(header, rows),
        "",
    ]


def _compare_section(result: dict) -> list[str]:
    cmp = result["compare"]
    lines = [
        "## Compared with " + (f"`{cmp['name']}`" if cmp.get("name") else "the other model"),
        "",
        "Per layer: total-variation distance between the two expert-share distributions, mean top-k "
        "overlap |A ∩ B|/k and KL(compare || model) of the router distributions on the same tokens, and "
        "the change (model minus compare) in first-choice repeat rate and router entropy.",
        "",
    ]
    for name, rows in cmp["diff"].items():
        lines += [f"### {name}", ""]
        body = [
            [
                str(r["layer"]),
                _num(r["share_tv"]),
                _num(r["topk_overlap"]),
                _num(r["kl"], 4),
                _signed_pct(r["repeat_delta"].get("first_choice")),
                f"{r['entropy_delta']:+.3f}",
            ]
            for r in rows
        ]
        header = ["layer", "share TV", "top-k overlap", "KL", "Δ first repeat", "Δ entropy"]
        lines += _table(header, body) + [""]
    top = cmp["moved_most"][:3]
    described = [
        f"layer {r['layer']} (top-k overlap {_num(r['topk_overlap'])}, share TV {_num(r['share_tv'])})" for r in top
    ]
    lines += ["Layers that moved most: " + "; ".join(described) + ".", ""]
    return lines


def render_markdown(result: dict) -> str:
    m = result["model"]
    src = ", ".join(f"{n} ({s['texts']} texts, {s['tokens']} tokens)" for n, s in result["sources"].items())
    lines = [
        "# Routing report",
        "",
        (f"Model `{m['name']}`: " if m.get("name") else "Model: ")
        + f"{len(m['layers'])} MoE layers, {m['num_experts']} experts, top-{m['top_k']}; "
        + f"texts cut to {m['max_length']} tokens.",
        f"Sources: {src}.",
        "",
    ]
    lines += _repeat_section(result) + _balance_section(result)
    if "compare" in result:
        lines += _compare_section(result)
    if result.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"
