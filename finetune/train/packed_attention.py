"""SDPA for padding-free batches: attention within each packed row, not over the whole pack.

    finetune sft RECIPE          # on by default when sft.padding_free is on and the model runs SDPA

Why this exists: a padding-free batch is one sequence of T tokens holding every row of the batch.
transformers keeps the rows apart with a block-diagonal causal mask (finetune/train/args.py), and
SDPA's CPU kernels and its masked GPU kernels compute every one of the T x T query-key scores and
only then mask them: T^2 work where the rows need sum(len_i^2), 16x more for 16 equal rows
(bench/packed_attention.py). Flash-attention's varlen kernel reads the row boundaries instead (TRL's
collator passes them as cu_seq_lens_q); this is the same idea for SDPA, which is what runs where
flash-attention is not installed, CPUs included.

How: rows whose block of the model's mask is the plain causal triangle are sorted by length and
cut into groups of similar length; each group runs as one causal SDPA call on its rows padded at
the end to the group's longest. Under a causal mask a row's real tokens never see the padding that
follows them, and the padded positions' outputs are dropped, so this is exact. The padding costs a
bounded share more attention work than the rows alone (WASTE, FLOOR), and one call per group
instead of per row is what keeps many short rows cheap. A row with any other block (a sliding
window shorter than the row, chunks) runs alone with its block of the mask. Tested against the
rows run one by one (tests/unit/train/test_padding_free.py).

Layer: train; imports torch and transformers only.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("finetune")

NAME = "sdpa_packed_rows"  # "sdpa" in the name: transformers runs its SDPA support checks for it
# A group's padded attention work may exceed its rows' own by WASTE, or by the work of one row of
# FLOOR tokens, whichever is more: below that, a separate SDPA call costs more than the padding (on
# the bundled model, 25% alone cut many short rows into 4.6 calls per layer, where 2 would do).
WASTE, FLOOR = 0.25, 128


@dataclass
class Plan:
    """How one packed sequence runs: its row sizes, groups of causal rows, rows alone with their mask block."""

    sizes: list[int]  # tokens per row, in pack order
    groups: list[tuple[list[int], torch.Tensor | None]]  # (rows, their tokens' places in the padded group or None)
    masked: list[tuple[int, int, int]]  # (row, start, end): rows that keep their block of the mask
    order: torch.Tensor | None  # pack position -> place in the outputs; None when they are in pack order


def packed_rows_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *args, **kwargs):
    """transformers' SDPA attention within each packed row when the batch says where rows start.

    query/key/value: (batch, heads, tokens, head_dim). Without row boundaries (padded batches,
    generation with a cache, a batch of more than one sequence) this is transformers' SDPA as is."""
    starts = kwargs.get("cu_seq_lens_q")
    if (starts is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or kwargs.get("position_bias") is not None or starts.numel() <= 2):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    plan = _plan(starts, attention_mask, query.shape[2])
    # Few operations per layer, each on whole groups (small operations cost more in overhead
    # than in arithmetic at these sizes): one split per tensor, rows as (tokens, heads, dim) views;
    # per group one pad, one SDPA call, one gather of the real tokens; one reordering at the end.
    # Gathers touch only the outputs: a gather from the whole pack would cost a pack-sized
    # scatter in its backward for every group (11% of a step on the bundled model, measured).
    rows_q, rows_k, rows_v = (t[0].transpose(0, 1).split(plan.sizes) for t in (query, key, value))
    outputs = []  # (tokens, heads, head_dim) pieces, group by group
    for group, kept in plan.groups:
        if kept is None:  # one row: (1, heads, n, dim)
            q, k, v = (rows[group[0]].transpose(0, 1).unsqueeze(0) for rows in (rows_q, rows_k, rows_v))
        else:  # (rows, heads, longest, dim), zeros after each row's end
            q, k, v = (pad_sequence([rows[i] for i in group], batch_first=True).transpose(1, 2)
                       for rows in (rows_q, rows_k, rows_v))
        out, _ = sdpa_attention_forward(module, q, k, v, None, *args, **kwargs)  # (rows, longest, heads, dim)
        outputs.append(out[0] if kept is None else out.flatten(0, 1).index_select(0, kept))
    for i, start, end in plan.masked:
        q, k, v = (rows[i].transpose(0, 1).unsqueeze(0) for rows in (rows_q, rows_k, rows_v))
        out, _ = sdpa_attention_forward(module, q, k, v, attention_mask[..., start:end, start:end], *args, **kwargs)
        outputs.append(out[0])
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return (out if plan.order is None else out.index_select(0, plan.order)).unsqueeze(0), None


_memo: dict = {}


def _plan(starts: torch.Tensor, mask: torch.Tensor | None, tokens: int) -> Plan:
    """Worked out once per forward, not per layer: every layer gets the same row-start tensor, and
    every layer of one attention kind the same mask object (reading a GPU tensor's starts waits for
    the GPU; checking the blocks reads the mask)."""
    if _memo.get("starts") is not None and _memo["starts"]() is starts and _memo["mask"]() is mask:
        return _memo["plan"]
    bounds = starts.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1:]} does not cover the {tokens} packed tokens")
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    plain = _plain_causal_rows(mask, bounds)
    causal = sorted((i for i, p in enumerate(plain) if p), key=lambda i: sizes[i])
    device = starts.device
    groups, placed = [], []
    for group in _groups(causal, sizes):
        longest = max(sizes[i] for i in group)
        kept = None if len(group) == 1 else torch.cat(
            [torch.arange(sizes[i], device=device) + j * longest for j, i in enumerate(group)])
        groups.append((group, kept))
        placed += group
    masked = [(i, bounds[i], bounds[i + 1]) for i, p in enumerate(plain) if not p]
    placed += [i for i, _, _ in masked]
    order = None
    if placed != sorted(placed):
        # the pack position of each output token, inverted: for each pack position, its output place
        where = torch.cat([torch.arange(bounds[i], bounds[i + 1], device=device) for i in placed])
        order = torch.empty_like(where)
        order[where] = torch.arange(len(where), device=device)
    plan = Plan(sizes, groups, masked, order)
    _memo.update(starts=weakref.ref(starts), mask=(lambda: None) if mask is None else weakref.ref(mask), plan=plan)
    return plan


def _groups(rows: list[int], sizes: list[int]) -> list[list[int]]:
    """Rows sorted by length, cut where padding the group to its longest row would cost more than
    the slack above the rows' own attention work (sum of length squared): WASTE of it, or FLOOR^2."""
    out, current, own = [], [], 0
    for i in rows:
        n = sizes[i]
        if current and (len(current) + 1) * n * n > own + n * n + max(WASTE * (own + n * n), FLOOR * FLOOR):
            out.append(current)
            current, own = [], 0
        current.append(i)
        own += n * n
    return out + [current] if current else out


def _plain_causal_rows(mask: torch.Tensor | None, bounds: list[int]) -> list[bool]:
    """Per packed row: whether the mask restricted to it is the causal triangle (True for every row
    without a mask: SDPA then runs each row causal)."""
    if mask is None:
        return [True] * (len(bounds) - 1)
    if mask.dtype != torch.bool:  # an additive float mask: every row keeps its block
        return [False] * (len(bounds) - 1)
    checks = [(mask[..., start:end, start:end]
               == torch.ones(end - start, end - start, dtype=torch.bool, device=mask.device).tril()).all()
              for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.stack(checks).tolist()  # one read of the device's answers, not one per row


def register() -> None:
    """Make NAME a valid attn_implementation (the attention and its mask: the mask is SDPA's own)."""
    AttentionInterface.register(NAME, packed_rows_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_for_padding_free(model, padding_free: bool) -> bool:
    """Switch a model that runs SDPA to NAME for padding-free training; say so. Returns whether it switched.

    Eager, flex and flash-attention models are left alone: flash reads the row boundaries itself."""
    config = getattr(model, "config", None)
    if not padding_free or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    log.info("padding-free batches: SDPA within each packed row (%s), not over the whole packed sequence", NAME)
    return True
