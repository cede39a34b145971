"""Files of the long-context checks: JSON, Markdown and PNG for passkey and perplexity by context.

    finetune eval MODEL_OR_RUN --passkey --long-ppl FILE --report-dir DIR

passkey.json / passkey.md / passkey.png (heat-map of accuracy, length x depth) and
long_ppl.json / long_ppl.md / long_ppl.png (perplexity against context length). Plots use
matplotlib's object API on the Agg canvas (no pyplot state, safe in headless jobs).
Also parses the CLI's length lists ("512,1k,2k"). Files are written beside and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from finetune.errors import UserError
from finetune.eval import long_ppl, passkey


def parse_lengths(text: str, flag: str) -> list[int]:
    """'512,1k,2K,32768' -> [512, 1024, 2048, 32768] (k = 1024 tokens)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise UserError(f"{flag} {text}: `{part}` is not a token count; write e.g. 512,1k,2k") from None
        if value < 1:
            raise UserError(f"{flag} {text}: lengths are positive token counts")
        out.append(value)
    if not out:
        raise UserError(f"{flag}: give at least one length, e.g. {flag} 512,1k")
    return out


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write beside and rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _save(fig: Figure, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def passkey_heatmap(results: dict, path: Path, title: str) -> None:
    """Accuracy by length (x) and depth (y, 0 = start at the top), beyond-context cells greyed."""
    lengths, depths = results["lengths"], results["depths"]
    grid = [[passkey.lookup(results, n, d)["accuracy"] for n in lengths] for d in depths]
    fig = Figure(figsize=(1.1 * len(lengths) + 2.4, 0.55 * len(depths) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = LinearSegmentedColormap.from_list("retrieval", ["#d7301f", "#fdd49e", "#1a9850"])
    cmap = cmap.with_extremes(bad="#d9d9d9")
    values = [[float("nan") if v is None else v for v in row] for row in grid]
    image = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "beyond\ncontext" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    _save(fig, path)


def ppl_plot(results: dict, path: Path, title: str) -> None:
    points = [p for p in results["curve"] if p["status"] == "ok"]
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([p["context"] for p in points], [p["perplexity"] for p in points], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["context"] for p in points], [_label(p["context"]) for p in points])
    ax.set_xlabel("context before the scored tokens (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)


def write_passkey(results: dict, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "passkey.json", out / "passkey.md", out / "passkey.png"]
    write_atomic(files[0], json.dumps({"model": name, **results}, indent=2))
    write_atomic(files[1], passkey.markdown(results, name))
    passkey_heatmap(results, files[2], f"passkey retrieval: {name}")
    return files


def write_long_ppl(results: dict, out: Path, name: str, source: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "long_ppl.json", out / "long_ppl.md", out / "long_ppl.png"]
    write_atomic(files[0], json.dumps({"model": name, "text": source, **results}, indent=2))
    write_atomic(files[1], long_ppl.markdown(results, name, source))
    ppl_plot(results, files[2], f"perplexity by context: {name}")
    return files
