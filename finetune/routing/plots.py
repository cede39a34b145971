"""PNG plots of the routing report's dict (report.py); `finetune routing ... --output DIR` writes them.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it
is safe inside notebooks and headless jobs alike. matplotlib is a core dependency.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _picked_layers(layers: list[int]) -> list[int]:
    """Positions of the first, middle and last MoE layers (the paper shows layers 0, 15, 31)."""
    return sorted({0, len(layers) // 2, len(layers) - 1})


def expert_share(sources: dict, model: dict, path: Path, title: str) -> None:
    """Grouped bars: share of assignments per expert for each source (paper's Figure 7)."""
    picked = _picked_layers(model["layers"])
    n_exp, names = model["num_experts"], list(sources)
    fig, axes = _figure(len(picked), 1, max(6.0, 0.55 * n_exp + 2), 2.4 * len(picked) + 0.6)
    width = 0.8 / len(names)
    for ax, pos in zip(axes, picked):
        for j, name in enumerate(names):
            share = sources[name]["layers"][pos]["share"]
            ax.bar([e - 0.4 + width * (j + 0.5) for e in range(n_exp)], share, width, label=name)
        ax.axhline(1 / n_exp, color="gray", linestyle="--", linewidth=1, label="uniform")
        ax.set_title(f"layer {model['layers'][pos]}", fontsize=10)
        ax.set_ylabel("share of assignments")
        ax.set_xticks(range(n_exp))
    axes[-1].set_xlabel("expert")
    axes[0].legend(fontsize=8, ncols=min(len(names) + 1, 4))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def repeated_experts(result: dict, path: Path) -> None:
    """Repeat rate per layer for each source and depth, with the random baseline (paper Table 5)."""
    depths = list(result["baselines"])
    layers = result["model"]["layers"]
    fig, axes = _figure(1, len(depths), 4.5 * len(depths), 3.6)
    for ax, depth in zip(axes, depths):
        for name, stats in result["sources"].items():
            rates = [row["repeat"][depth] for row in stats["layers"]]
            ax.plot(layers, [r if r is not None else float("nan") for r in rates], marker="o", label=name)
        ax.axhline(result["baselines"][depth], color="gray", linestyle="--", label="random")
        ax.set_title(depth.replace("_", " "), fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("consecutive tokens, same expert")
    axes[0].legend(fontsize=8)
    fig.suptitle("Repeated expert assignments")
    fig.savefig(path, dpi=110)


def compare(result: dict, path: Path) -> None:
    """Per layer: share TV distance, top-k overlap and KL against the compared model."""
    layers = result["model"]["layers"]
    panels = [("share_tv", "share TV distance"), ("topk_overlap", "top-k overlap"), ("kl", "KL(compare || model)")]
    fig, axes = _figure(1, len(panels), 13, 3.6)
    for ax, (key, label) in zip(axes, panels):
        for name, rows in result["compare"]["diff"].items():
            values = [r[key] if r[key] is not None else float("nan") for r in rows]
            ax.plot(layers, values, marker="o", label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    # Two independent uniform routings share k/E of their experts on average.
    independent = result["model"]["top_k"] / result["model"]["num_experts"]
    axes[1].axhline(independent, color="gray", linestyle="--", label="independent")
    axes[1].set_ylim(0, 1.02)
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Routing change per layer (model vs compare)")
    fig.savefig(path, dpi=110)


def write_all(result: dict, out: Path) -> list[str]:
    """Write every plot that applies; return their file names."""
    written = ["expert_share.png", "repeated_experts.png"]
    expert_share(result["sources"], result["model"], out / written[0], "Share of expert assignments")
    repeated_experts(result, out / written[1])
    if "compare" in result:
        compare(result, out / "compare.png")
        title = "Share of expert assignments, compared model"
        expert_share(result["compare"]["sources"], result["model"], out / "expert_share_compare.png", title)
        written += ["compare.png", "expert_share_compare.png"]
    return written
