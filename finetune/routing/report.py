"""Routing report: which experts each data source uses, per layer, as in the Mixtral paper's section 5.

    finetune routing MODEL_OR_RUN --data code.jsonl chat.jsonl [--compare BASE] --output DIR

(the CLI loads the models and calls `load_sources` then `routing_report`). Writes to DIR:
  routing.json   every figure below, per source and layer
  routing.md     tables: repeated-expert rates with baselines (paper Table 5), load balance,
                 and with --compare the per-layer change and the layers that moved most
  expert_share.png       share of assignments per expert, first/middle/last layer (paper Fig. 7)
  repeated_experts.png   repeated-expert rates per layer with the random baseline
  compare.png            with --compare: share TV distance, top-k overlap and KL per layer
  expert_share_compare.png  with --compare: Fig. 7 for the compared model
Metric definitions: metrics.py. Tested by tests/unit/routing/test_routing_report.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from finetune.errors import UserError
from finetune.routing import metrics as M
from finetune.routing.capture import RoutingCapture
from finetune.routing.markdown import render_markdown
from finetune.routing.sources import load_sources

__all__ = ["routing_report", "load_sources"]
log = logging.getLogger(__name__)


class RoutingRunner:
    """One model with its tokenizer and a full-mode capture: texts -> (input ids, Routing)."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.capture = RoutingCapture(model, mode="full")
        self.device = next(model.parameters()).device
        self.was_training = model.training
        model.eval()

    def close(self):
        self.capture.close()
        self.model.train(self.was_training)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Right-padded ids and mask; None when no text has a token."""
        bos = self.tokenizer.bos_token
        # Chat-template renderings already start with BOS; adding another shifts every position.
        add_special = not (bos and all(t.startswith(bos) for t in texts))
        enc = self.tokenizer(texts, add_special_tokens=add_special, truncation=True, max_length=self.max_length)
        rows = [r for r in enc["input_ids"] if r]
        if not rows:
            return None
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Right padding: without position_ids the model numbers positions 0..S-1 from the left.
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return input_ids, mask

    @torch.no_grad()
    def run(self, input_ids, mask):
        self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return self.capture.last


class _Tally:
    """Sums over batches for one model on one source, per MoE layer."""

    def __init__(self, routing):
        n, e, self.k = len(routing.layers), routing.logits[0].shape[-1], routing.topk[0].shape[-1]
        self.layers, self.num_experts, self.depths = routing.layers, e, M.repeat_depths(self.k)
        self.counts, self.first = torch.zeros(n, e), torch.zeros(n, e)
        self.entropy, self.tokens, self.texts = torch.zeros(n), 0, 0
        self.hits = {d: [0] * n for d in self.depths}
        self.pairs = [0] * n

    def add(self, r) -> None:
        self.tokens += int(r.mask.sum())
        self.texts += r.mask.shape[0]
        for i, (logits, topk) in enumerate(zip(r.logits, r.topk)):
            self.counts[i] += M.expert_counts(topk, r.mask, self.num_experts).cpu()
            self.first[i] += M.expert_counts(topk[..., :1], r.mask, self.num_experts).cpu()
            self.entropy[i] += float(M.masked_sum(M.token_entropy(logits), r.mask))
            for d in self.depths:
                hits, pairs = M.repeat_counts(topk, r.mask, d, r.starts)
                self.hits[d][i] += hits
            self.pairs[i] += pairs  # the same pairs at every depth

    def summary(self) -> dict:
        layers = []
        for i, layer in enumerate(self.layers):
            ratio, cv = M.imbalance(self.counts[i])
            pairs = self.pairs[i]
            rate = {M.depth_name(d): self.hits[d][i] / pairs if pairs else None for d in self.depths}
            layers.append(
                {
                    "layer": layer,
                    "share": M.load_share(self.counts[i]).tolist(),
                    "imbalance": ratio,
                    "cv": cv,
                    "entropy": float(self.entropy[i]) / max(self.tokens, 1),
                    "dead_experts": M.dead_experts(self.counts[i]),
                    "repeat": rate,
                    "first_choice_load_baseline": M.load_repeat_baseline(self.first[i]),
                    "pairs": self.pairs[i],
                }
            )
        return {"texts": self.texts, "tokens": self.tokens, "layers": layers}


class _Drift:
    """Sums of per-token top-k overlap and KL(compare || model) over tokens both models saw."""

    def __init__(self, n_layers: int):
        self.overlap, self.kl, self.tokens = [0.0] * n_layers, [0.0] * n_layers, 0

    def add(self, ref, now) -> None:
        mask = now.mask
        self.tokens += int(mask.sum())
        for i in range(len(now.layers)):
            self.overlap[i] += float(M.masked_sum(M.token_topk_overlap(ref.topk[i], now.topk[i]), mask))
            self.kl[i] += float(M.masked_sum(M.token_kl(ref.logits[i], now.logits[i]), mask))


def _batches(texts: list[str], size: int):
    # Similar lengths together: less padding, same figures (everything is summed over tokens).
    ordered = sorted((t for t in texts if t), key=len)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def _diff(mine: dict, theirs: dict, drift: _Drift | None) -> list[dict]:
    rows = []
    for i, (a, b) in enumerate(zip(mine["layers"], theirs["layers"])):
        same = drift is not None and drift.tokens > 0
        rows.append(
            {
                "layer": a["layer"],
                "share_tv": M.share_tv(torch.tensor(a["share"]), torch.tensor(b["share"])),
                "topk_overlap": drift.overlap[i] / drift.tokens if same else None,
                "kl": drift.kl[i] / drift.tokens if same else None,
                "same_tokens": drift.tokens if same else 0,
                "entropy_delta": a["entropy"] - b["entropy"],
                "imbalance_delta": a["imbalance"] - b["imbalance"],
                "repeat_delta": {
                    k: (v - b["repeat"][k]) if v is not None and b["repeat"].get(k) is not None else None
                    for k, v in a["repeat"].items()
                },
            }
        )
    return rows


def _moved_most(diff: dict[str, list[dict]]) -> list[dict]:
    """Layers ranked by how much routing changed, averaged over sources: top-k disagreement
    (1 - overlap) on the same tokens where available, else the share TV distance."""
    per_layer: dict[int, list[dict]] = {}
    for rows in diff.values():
        for row in rows:
            per_layer.setdefault(row["layer"], []).append(row)
    ranked = []
    for layer, rows in per_layer.items():
        overlaps = [r["topk_overlap"] for r in rows if r["topk_overlap"] is not None]
        kls = [r["kl"] for r in rows if r["kl"] is not None]
        ranked.append(
            {
                "layer": layer,
                "share_tv": sum(r["share_tv"] for r in rows) / len(rows),
                "topk_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
                "kl": sum(kls) / len(kls) if kls else None,
            }
        )
    if all(r["topk_overlap"] is not None for r in ranked):
        return sorted(ranked, key=lambda r: (1 - r["topk_overlap"], r["share_tv"]), reverse=True)
    return sorted(ranked, key=lambda r: r["share_tv"], reverse=True)


def routing_report(
    model,
    tokenizer,
    sources: dict[str, list[str]],
    out_dir,
    *,
    compare: tuple | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
    progress: bool = True,
    plots: bool = True,
) -> dict:
    """Route every source's texts through `model` (and `compare`), write the report, return its dict.

    `compare` = (model, tokenizer or None for the same) of a model with the same MoE layout, e.g. the base
    of a fine-tuned `model`; differences are model minus compare and KL is KL(compare || model).
    Top-k overlap and KL need the same tokens: they are computed on batches that both tokenizers
    encode identically (the usual case for a fine-tune of the same base). `plots=False` skips the
    PNGs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = {name: texts for name, texts in sources.items() if any(texts)}
    if not sources:
        raise ValueError("routing_report needs at least one source with text")
    try:
        main = RoutingRunner(model, tokenizer, max_length)
    except ValueError as err:  # a dense model: nothing to report
        raise UserError(str(err)) from None
    try:
        other = RoutingRunner(compare[0], compare[1] or tokenizer, max_length) if compare else None
    except ValueError as err:
        main.close()
        raise UserError(f"--compare: {err}") from None
    tallies, other_tallies, drifts = {}, {}, {}
    try:
        total = sum(-(-sum(1 for t in texts if t) // batch_size) for texts in sources.values())
        with tqdm(total=total, desc="routing", unit="batch", disable=not progress) as bar:
            for name, texts in sources.items():
                bar.set_postfix_str(name)
                for batch in _batches(texts, batch_size):
                    bar.update(1)
                    encoded = main.encode(batch)
                    if encoded is None:
                        continue
                    r = main.run(*encoded)
                    tallies.setdefault(name, _Tally(r)).add(r)
                    if other is not None and (encoded_b := other.encode(batch)) is not None:
                        rb = other.run(*encoded_b)
                        other_tallies.setdefault(name, _Tally(rb)).add(rb)
                        drift = drifts.setdefault(name, _Drift(len(r.layers)))
                        if all(torch.equal(a, b) for a, b in zip(encoded, encoded_b)):
                            drift.add(rb, r)
    finally:
        if other is not None:  # reverse order: `compare` may be `model` itself
            other.close()
        main.close()

    if not tallies:
        raise ValueError("no text in any source produced a token")
    first = next(iter(tallies.values()))
    layout = (first.layers, first.num_experts)
    if any((t.layers, t.num_experts) != layout for t in other_tallies.values()):
        raise UserError("--compare: the models have different MoE layers or expert counts; nothing to compare")
    result = {
        "model": {
            "name": getattr(getattr(model, "config", None), "_name_or_path", ""),
            "layers": first.layers,
            "num_experts": first.num_experts,
            "top_k": first.k,
            "max_length": max_length,
        },
        "baselines": {M.depth_name(d): M.random_repeat_baseline(first.num_experts, d) for d in first.depths},
        "sources": {name: t.summary() for name, t in tallies.items()},
    }
    if other_tallies:
        theirs = {name: t.summary() for name, t in other_tallies.items()}
        diff = {name: _diff(result["sources"][name], theirs[name], drifts.get(name)) for name in theirs}
        result["compare"] = {
            "name": getattr(getattr(compare[0], "config", None), "_name_or_path", ""),
            "sources": theirs,
            "diff": diff,
            "moved_most": _moved_most(diff),
        }

    result["plots"] = _plots(result, out) if plots else []
    (out / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "routing.md").write_text(render_markdown(result))
    return result


def _plots(result: dict, out: Path) -> list[str]:
    try:
        from finetune.routing import plots  # matplotlib only when plots are asked for (--no-plots skips it)
    except ImportError:  # matplotlib is a dependency; an environment may still lack it
        log.warning("matplotlib not installed: routing report without plots (pip install matplotlib)")
        return []
    return plots.write_all(result, out)
