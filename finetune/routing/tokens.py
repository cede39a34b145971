"""Token view of routing (the Mixtral paper's Figure 8): sample texts, each token coloured by its top-1 expert.

    finetune routing runs/tiny-moe/dpo --data data/tiny-tasks/test.jsonl --output reports/routing
    # writes, beside routing.md: tokens.html (self-contained page), tokens.png and tokens.json (the data)

For the first, a middle and the last MoE layer (as the paper's Figure 7 and plots.py pick them),
the first texts of every source are routed once more through the model with the same capture
as the report (capture.py, via report.RoutingRunner: same encoding, same hooks) and each token is shown
on the colour of the expert the router ranked first. Every token is a
`<span data-layer data-pos data-id data-expert>` so a program (tests/unit/routing/test_routing_tokens.py) can read
back what the colours say. Sits in routing/; matplotlib is imported inside `write_png` only.
"""

from __future__ import annotations

import colorsys
import html
import json
from pathlib import Path

import torch

from finetune.routing.report import RoutingRunner

PER_SOURCE = 3  # texts per source shown
MAX_SAMPLES = 9
MAX_TOKENS = 96  # tokens per text shown: the page is for reading, not for statistics


def expert_colour(expert: int, num_experts: int) -> str:
    """A distinct light colour per expert (hues evenly spaced), dark text stays readable on it."""
    r, g, b = colorsys.hls_to_rgb(expert / max(num_experts, 1), 0.72, 0.75)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def picked_layers(n: int) -> list[int]:
    """Positions of the first, middle and last MoE layers (the paper shows layers 0, 15, 31 of 32)."""
    return sorted({0, n // 2, n - 1})


def sample_texts(sources: dict[str, list[str]]) -> list[tuple[str, int, str]]:
    """(source, row index within the source, text): the first non-empty texts of each source."""
    picked = []
    for name, texts in sources.items():
        rows = [(name, i, t) for i, t in enumerate(texts) if t][:PER_SOURCE]
        picked.extend(rows)
    return picked[:MAX_SAMPLES]


def _display(token: str) -> str:
    """A tokenizer piece as a person reads it: SentencePiece's word marker as a space, byte tokens decoded."""
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        char = chr(int(token[3:5], 16))
        return {"\n": "\u21b5", "\t": "\u21e5"}.get(char, char if char.isprintable() else token)
    return token.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\u21b5")


@torch.no_grad()
def token_routing(model, tokenizer, sources: dict[str, list[str]], max_length: int = MAX_TOKENS) -> dict:
    """Each sample's token ids and pieces and, per picked layer, every token's top-1 expert."""
    runner = RoutingRunner(model, tokenizer, min(max_length, MAX_TOKENS))
    samples, layers, num_experts = [], None, None
    try:
        for source, row, text in sample_texts(sources):
            encoded = runner.encode([text])  # one text per forward: no padding to mask
            if encoded is None:
                continue
            routing = runner.run(*encoded)
            picked = picked_layers(len(routing.layers))
            layers = [routing.layers[p] for p in picked]
            num_experts = routing.logits[0].shape[-1]
            ids = encoded[0][0].tolist()
            samples.append({
                "source": source, "row": row, "ids": ids,
                "tokens": [_display(t) for t in tokenizer.convert_ids_to_tokens(ids)],
                "top1": {str(routing.layers[p]): routing.topk[p][0, :, 0].tolist() for p in picked},
            })
    finally:
        runner.close()
    return {"layers": layers or [], "num_experts": num_experts or 0, "samples": samples}


def render_html(view: dict, title: str) -> str:
    """The whole page as one string: inline CSS, no scripts, no external files."""
    n = view["num_experts"]
    legend = "".join(f'<span class="tok" style="background:{expert_colour(e, n)}">expert {e}</span>' for e in range(n))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:2}"
         ".text{font-family:monospace;white-space:pre-wrap;margin:.3em 0 1em}"
         ".tok{padding:.15em .05em;border-right:1px solid #fff;color:#111}"
         "h2{margin-top:1.5em}.src{color:#555;font-size:.9em}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>",
        ("<p>Each token's background is the expert its router ranked first (top-1), in the first, a middle "
         "and the last MoE layer, as in the Mixtral paper's Figure 8. Hover a token for its id and expert.</p>"),
        f'<p class="legend">{legend}</p>',
    ]
    for layer in view["layers"]:
        parts.append(f'<h2>MoE layer {layer}</h2><section data-layer="{layer}">')
        for k, s in enumerate(view["samples"]):
            experts = s["top1"][str(layer)]
            spans = "".join(
                f'<span class="tok" data-layer="{layer}" data-pos="{i}" data-id="{tid}" data-expert="{e}" '
                f'title="token {tid}, expert {e}" style="background:{expert_colour(e, n)}">{html.escape(piece)}</span>'
                for i, (tid, piece, e) in enumerate(zip(s["ids"], s["tokens"], experts)))
            parts.append(f'<div class="src">{html.escape(s["source"])}, text {s["row"]}</div>'
                         f'<div class="text" data-sample="{k}" data-source="{html.escape(s["source"])}" '
                         f'data-row="{s["row"]}">{spans}</div>')
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_png(view: dict, path: Path, title: str, per_line: int = 16) -> None:
    """The same view as a picture: one panel per picked layer, tokens as coloured cells in rows of `per_line`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only when a PNG is asked for
    from matplotlib.figure import Figure  # matplotlib: only when the PNG is asked for
    from matplotlib.patches import Rectangle  # (as above)

    n = view["num_experts"]
    lines_per_sample = [-(-len(s["ids"]) // per_line) for s in view["samples"]]
    rows = sum(lines_per_sample) + len(view["samples"])  # a blank line between samples
    fig = Figure(figsize=(per_line * 0.75 + 0.5, 0.6 + len(view["layers"]) * (0.3 * rows + 0.5)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(view["layers"]), 1, squeeze=False)[:, 0]
    for ax, layer in zip(axes, view["layers"]):
        y = 0
        for s in view["samples"]:
            for i, (piece, e) in enumerate(zip(s["tokens"], s["top1"][str(layer)])):
                x, line = i % per_line, y + i // per_line
                ax.add_patch(Rectangle((x, -line - 1), 0.96, 0.9, facecolor=expert_colour(e, n), edgecolor="none"))
                shown = piece if len(piece) <= 7 else piece[:6] + "\u2026"
                ax.text(x + 0.48, -line - 0.55, shown.replace("$", r"\$"), ha="center", va="center", fontsize=7,
                        family="monospace")
            y += -(-len(s["ids"]) // per_line) + 1
        ax.set_xlim(0, per_line)
        ax.set_ylim(-max(y, 1), 0)
        ax.set_axis_off()
        ax.set_title(f"MoE layer {layer}: token background = top-1 expert", fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, facecolor=expert_colour(e, n)) for e in range(n)]
    fig.legend(handles, [f"expert {e}" for e in range(n)], loc="outside lower center", ncols=min(n, 8), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


def write_token_view(model, tokenizer, sources: dict[str, list[str]], out_dir, *, max_length: int = MAX_TOKENS,
                     png: bool = True, title: str = "") -> list[Path]:
    """tokens.html and tokens.json (and tokens.png unless png=False) in out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    view = token_routing(model, tokenizer, sources, max_length)
    title = title or f"Top-1 expert per token: {getattr(getattr(model, 'config', None), '_name_or_path', '') or 'model'}"
    written = [out / "tokens.html", out / "tokens.json"]
    written[0].write_text(render_html(view, title), encoding="utf-8")
    written[1].write_text(json.dumps(view) + "\n")
    if png and view["samples"]:
        try:
            write_png(view, out / "tokens.png", title)
            written.append(out / "tokens.png")
        except ImportError:  # matplotlib is a dependency; an environment may still lack it
            pass
    return written
