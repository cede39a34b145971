"""Routing metrics for Mixture-of-Experts models: pure functions on router outputs.

Nothing here touches a model; `capture.py` records the tensors, `callback.py` and `report.py`
call these. `python -m pytest tests/unit/routing/test_routing_metrics.py` checks them against hand-built
routings. Modelled on the Mixtral paper's routing analysis (arXiv 2401.04088, section 5).

Shapes, for one MoE layer:
  topk    (B, S, k) integer expert ids, column 0 = first choice (highest router probability;
          `torch.topk` returns them sorted, which every supported router uses)
  logits  (B, S, E) router logits; probabilities are their softmax (the Mixtral/Qwen/OLMoE router)
  mask    (B, S) bool, True for real tokens, False for padding; None = every token is real
  starts  (B, S) bool, True where a new sequence starts inside a packed row (position_ids == 0);
          None = each row is one sequence

Definitions:
  load share        of all (token, slot) assignments in the layer, the fraction going to expert e;
                    each of a token's k choices counts once, so shares sum to 1 and uniform is 1/E
                    (the paper's Figure 7 quantity).
  imbalance         max share / mean share (1 = perfectly balanced, E = one expert takes all),
                    and the coefficient of variation std/mean over experts (population std).
  entropy           mean over real tokens of H(softmax(logits)) in nats; log(E) is the maximum.
  dead experts      experts with zero assignments over the tokens seen.
  repeat rate @ m   over pairs of consecutive real tokens (t, t+1) of the same sequence, the fraction
                    whose first-m choices share an expert: top_m(t) ∩ top_m(t+1) ≠ ∅.
                    m = 1 is the paper's "First choice" (same first expert); m = 2 is its
                    "First or second choice" (the same expert appears among the first two choices
                    of both tokens). The paper's baseline 1 - 6/8·5/7 pins this reading down: the
                    narrower "t+1's first choice is in t's top 2" would have baseline 2/8 = 25%.
                    For k > 2 we also report m = k (any shared expert).
  random baseline   if each token drew its first m experts uniformly without replacement,
                    independently of its neighbour: P(disjoint) = C(E-m, m) / C(E, m), so
                    baseline(E, m) = 1 - C(E-m, m) / C(E, m).  m = 1: 1/E (12.5% for E = 8);
                    m = 2, E = 8: 1 - (6·5)/(8·7) = 13/28 = 46.4%.
  load baseline     first-choice repeat rate expected from the layer's load alone: if first choices
                    were independent draws from the observed first-choice shares q, sum_e q_e^2.
                    A rate above it means locality, not just a favourite expert.
  top-k overlap     for two routings of the same tokens, mean over real tokens of |A ∩ B| / k.
  KL drift          mean over real tokens of KL(p_a || p_b) = sum_e p_a (log p_a - log p_b), p = softmax.
  share TV          total-variation distance 0.5 * sum_e |share_a - share_b| between two load shares.
"""

from __future__ import annotations

from math import comb

import torch
from torch import Tensor


def _mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """A (B, S) bool mask; all True when none was given."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(device=like.device, dtype=torch.bool)


def masked_sum(values: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of per-token `values` over real tokens (a 0-d tensor). Padding positions are dropped,
    not multiplied by 0: a fully masked row can hold NaN logits, and NaN * 0 is NaN."""
    m = _mask(mask, values)
    return values.float().masked_fill(~m, 0).sum()


def masked_mean(values: Tensor, mask: Tensor | None) -> float:
    """Mean of per-token `values` (B, S) over real tokens; nan when there are none."""
    n = _mask(mask, values).sum()
    return float(masked_sum(values, mask) / n) if n > 0 else float("nan")


# --- load -------------------------------------------------------------------------------------


def expert_counts(topk: Tensor, mask: Tensor | None, num_experts: int) -> Tensor:
    """Assignments per expert (E,) float, each (real token, slot) counting once."""
    weights = _mask(mask, topk).float().unsqueeze(-1).expand(topk.shape)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=topk.device)
    return counts.index_add_(0, topk.reshape(-1).long(), weights.reshape(-1))


def load_share(counts: Tensor) -> Tensor:
    """Counts per expert -> fraction of assignments per expert (zeros when nothing was counted)."""
    total = counts.sum(-1, keepdim=True)
    return counts / total.clamp_min(1e-12)


def imbalance(counts: Tensor) -> tuple[float, float]:
    """(max/mean, coefficient of variation) of per-expert counts; (nan, nan) for no tokens."""
    counts = counts.float()
    mean = counts.mean()
    if mean <= 0:
        return float("nan"), float("nan")
    return float(counts.max() / mean), float(counts.std(unbiased=False) / mean)


def dead_experts(counts: Tensor) -> list[int]:
    """Experts that received no assignment."""
    return [int(e) for e in (counts == 0).nonzero().flatten()]


# --- router distribution ----------------------------------------------------------------------


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of each token's router distribution (B, S)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def mean_router_entropy(logits: Tensor, mask: Tensor | None = None) -> float:
    return masked_mean(token_entropy(logits), mask)


# --- repeated assignments of consecutive tokens -----------------------------------------------


def pair_mask(mask: Tensor | None, starts: Tensor | None = None, like: Tensor | None = None) -> Tensor:
    """(B, S-1) bool: True where tokens t and t+1 are both real and in the same sequence.

    Pairs never cross rows (each row is its own sequence) nor, with `starts`, a packed boundary.
    """
    m = mask.to(torch.bool) if mask is not None else _mask(None, like)
    ok = m[:, :-1] & m[:, 1:]
    if starts is not None:
        ok = ok & ~starts.to(device=ok.device, dtype=torch.bool)[:, 1:]
    return ok


def repeat_hits(topk: Tensor, depth: int) -> Tensor:
    """(B, S-1) bool: True where token t's and token t+1's first `depth` choices share an expert."""
    a = topk[:, :-1, :depth].unsqueeze(-1)  # (B, S-1, m, 1)
    b = topk[:, 1:, :depth].unsqueeze(-2)  # (B, S-1, 1, m)
    return (a == b).any(-1).any(-1)


def repeat_counts(
    topk: Tensor, mask: Tensor | None, depth: int, starts: Tensor | None = None
) -> tuple[int, int]:
    """(repeated pairs, pairs) at `depth`, to sum over batches before dividing."""
    ok = pair_mask(mask, starts, like=topk)
    return int((repeat_hits(topk, depth) & ok).sum()), int(ok.sum())


def repeated_expert_rate(
    topk: Tensor, mask: Tensor | None = None, depth: int = 1, starts: Tensor | None = None
) -> float:
    """Fraction of consecutive-token pairs whose first `depth` choices share an expert (see top)."""
    hits, pairs = repeat_counts(topk, mask, depth, starts)
    return hits / pairs if pairs else float("nan")


def random_repeat_baseline(num_experts: int, depth: int) -> float:
    """Repeat rate at `depth` under uniform random routing: 1 - C(E-m, m) / C(E, m)."""
    return 1.0 - comb(num_experts - depth, depth) / comb(num_experts, depth)


def load_repeat_baseline(first_choice_counts: Tensor) -> float:
    """First-choice repeat rate expected from load alone: sum of squared first-choice shares."""
    q = load_share(first_choice_counts.float())
    return float((q * q).sum())


def repeat_depths(top_k: int) -> list[int]:
    """Depths reported for a top-k router: 1 and 2 as in the paper, and k when k > 2."""
    return sorted({1, min(2, top_k), top_k})


DEPTH_NAMES = {1: "first_choice", 2: "first_or_second"}


def depth_name(depth: int) -> str:
    return DEPTH_NAMES.get(depth, f"any_of_top{depth}")


# --- drift between two routings of the same tokens ---------------------------------------------


def token_topk_overlap(topk_a: Tensor, topk_b: Tensor) -> Tensor:
    """(B, S) fraction of token's k experts chosen by both routings, |A ∩ B| / k."""
    shared = (topk_a.unsqueeze(-1) == topk_b.unsqueeze(-2)).any(-1).sum(-1)
    return shared.float() / topk_a.shape[-1]


def token_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """(B, S) KL(softmax(a) || softmax(b)) in nats."""
    la = torch.log_softmax(logits_a.float(), dim=-1)
    lb = torch.log_softmax(logits_b.float(), dim=-1)
    return (la.exp() * (la - lb)).sum(-1)


def topk_overlap(topk_a: Tensor, topk_b: Tensor, mask: Tensor | None = None) -> float:
    return masked_mean(token_topk_overlap(topk_a, topk_b), mask)


def router_kl(logits_a: Tensor, logits_b: Tensor, mask: Tensor | None = None) -> float:
    return masked_mean(token_kl(logits_a, logits_b), mask)


def share_tv(share_a: Tensor, share_b: Tensor) -> float:
    """Total-variation distance between two load-share vectors."""
    return float(0.5 * (share_a.float() - share_b.float()).abs().sum())
