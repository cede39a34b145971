"""Routing metrics against hand-built routings with known answers (finetune/routing/metrics.py)."""

import math

import pytest
import torch

from finetune.routing import metrics as M


def topk_from_choices(first, second=None):
    """(B, S, k) expert ids from nested lists of first (and second) choices."""
    first = torch.tensor(first)
    if second is None:
        return first.unsqueeze(-1)
    return torch.stack([first, torch.tensor(second)], dim=-1)


def test_expert_counts_count_every_slot_of_real_tokens_only():
    topk = topk_from_choices([[0, 1, 2]], [[1, 2, 3]])
    mask = torch.tensor([[True, True, False]])
    assert M.expert_counts(topk, mask, 4).tolist() == [1, 2, 1, 0]
    assert M.expert_counts(topk, None, 4).tolist() == [1, 2, 2, 1]
    share = M.load_share(M.expert_counts(topk, mask, 4))
    assert share.tolist() == [0.25, 0.5, 0.25, 0.0]


def test_imbalance_and_dead_experts():
    counts = torch.tensor([4.0, 0.0, 2.0, 2.0])
    ratio, cv = M.imbalance(counts)
    assert ratio == pytest.approx(2.0)
    assert cv == pytest.approx(math.sqrt(2) / 2)  # population std sqrt(2), mean 2
    assert M.dead_experts(counts) == [1]
    assert M.imbalance(torch.ones(8)) == (pytest.approx(1.0), pytest.approx(0.0))
    assert all(math.isnan(x) for x in M.imbalance(torch.zeros(8)))


def test_entropy_uniform_peaked_and_padding_with_nan_logits():
    logits = torch.zeros(1, 3, 8)
    logits[0, 1] = torch.tensor([100.0] + [0.0] * 7)
    logits[0, 2] = float("nan")  # a padding row that attended to nothing
    mask = torch.tensor([[True, True, False]])
    ent = M.token_entropy(logits)
    assert ent[0, 0] == pytest.approx(math.log(8))
    assert ent[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert M.mean_router_entropy(logits, mask) == pytest.approx(math.log(8) / 2)


def test_first_choice_repeats_stay_within_sequences_and_skip_padding():
    # Row 0: 1 1 2 2 -> pairs (1,1) (1,2) (2,2): 2 of 3. Row 1: 2 2 with padding after: 1 of 1.
    # Row 0 ends with expert 2 and row 1 starts with 2: that is not a pair.
    topk = topk_from_choices([[1, 1, 2, 2], [2, 2, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert M.repeat_counts(topk, mask, 1) == (3, 4)
    assert M.repeated_expert_rate(topk, mask, 1) == pytest.approx(0.75)
    # Without the mask the padding pairs (2,7) (7,7) would count.
    assert M.repeat_counts(topk, None, 1) == (4, 6)


def test_packed_rows_do_not_pair_across_sequence_starts():
    topk = topk_from_choices([[5, 5, 5, 5]])
    starts = torch.tensor([[True, False, True, False]])  # position_ids 0 1 0 1
    assert M.repeat_counts(topk, None, 1, starts) == (2, 2)


def test_first_or_second_choice_is_any_shared_expert_among_the_first_two():
    first = [[0, 2, 2, 6, 1]]
    second = [[1, 1, 3, 7, 0]]
    # pairs: {0,1}->{2,1} share 1; {2,1}->{2,3} share 2 (first=first); {2,3}->{6,7} none;
    # {6,7}->{1,0} none.
    topk = topk_from_choices(first, second)
    assert M.repeat_counts(topk, None, 1) == (1, 4)
    assert M.repeat_counts(topk, None, 2) == (2, 4)
    # Token t+1's first choice equal to token t's second choice counts at depth 2 only.
    topk = topk_from_choices([[0, 1]], [[1, 5]])
    assert M.repeat_counts(topk, None, 1) == (0, 1)
    assert M.repeat_counts(topk, None, 2) == (1, 1)


def test_random_baselines_match_the_paper_and_closed_form():
    assert M.random_repeat_baseline(8, 1) == pytest.approx(0.125)
    assert M.random_repeat_baseline(8, 2) == pytest.approx(1 - 6 / 8 * 5 / 7)
    assert M.random_repeat_baseline(8, 2) == pytest.approx(13 / 28)
    assert M.random_repeat_baseline(64, 8) == pytest.approx(1 - math.comb(56, 8) / math.comb(64, 8))
    assert M.random_repeat_baseline(4, 2) == pytest.approx(5 / 6)  # disjoint: the 1 complement of 6 pairs
    assert M.random_repeat_baseline(3, 2) == 1.0  # two pairs of 3 experts always share one


@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4)])
def test_random_baselines_match_simulated_uniform_routing(experts, top_k):
    g = torch.Generator().manual_seed(0)
    # Uniform random top-k sets in random order: the first k of a random permutation.
    topk = torch.rand(8, 4000, experts, generator=g).argsort(-1)[..., :top_k]
    for depth in M.repeat_depths(top_k):
        rate = M.repeated_expert_rate(topk, None, depth)
        assert rate == pytest.approx(M.random_repeat_baseline(experts, depth), abs=0.01)


def test_load_baseline_is_sum_of_squared_first_choice_shares():
    assert M.load_repeat_baseline(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(0.375)
    assert M.load_repeat_baseline(torch.ones(8)) == pytest.approx(1 / 8)


def test_repeat_depths():
    assert M.repeat_depths(1) == [1]
    assert M.repeat_depths(2) == [1, 2]
    assert M.repeat_depths(8) == [1, 2, 8]
    assert [M.depth_name(d) for d in (1, 2, 8)] == ["first_choice", "first_or_second", "any_of_top8"]


def test_topk_overlap_counts_shared_experts_per_token():
    a = topk_from_choices([[0, 0, 0]], [[1, 1, 1]])
    b = topk_from_choices([[1, 2, 4]], [[0, 1, 5]])  # same set, half, disjoint
    assert M.token_topk_overlap(a, b).tolist() == [[1.0, 0.5, 0.0]]
    assert M.topk_overlap(a, b) == pytest.approx(0.5)
    assert M.topk_overlap(a, b, torch.tensor([[1, 1, 0]])) == pytest.approx(0.75)


def test_kl_between_router_distributions():
    start = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    now = torch.zeros(1, 1, 2)  # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert M.router_kl(start, now) == pytest.approx(expected)
    assert M.router_kl(start, start) == pytest.approx(0.0, abs=1e-7)
    assert M.router_kl(start + 5.0, start) == pytest.approx(0.0, abs=1e-6)  # logits shift: same softmax


def test_share_tv():
    a = torch.tensor([0.5, 0.5, 0.0, 0.0])
    b = torch.tensor([0.0, 0.5, 0.5, 0.0])
    assert M.share_tv(a, b) == pytest.approx(0.5)
    assert M.share_tv(a, a) == 0.0
