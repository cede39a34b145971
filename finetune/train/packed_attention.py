"""SDPA for padding-free batches: attention row by row inside the packed sequence, not over all of it.

    finetune sft RECIPE          # on by default when sft.padding_free is on and the model runs SDPA

Why this exists: a padding-free batch is one sequence of T tokens holding every row of the batch.
transformers keeps the rows apart with a block-diagonal causal mask (finetune/train/args.py), and
SDPA's CPU kernels and its masked GPU kernels compute every one of the T x T query-key scores and
only then mask them: T^2 work where the rows need sum(len_i^2), 16x more for 16 equal rows. On the
bundled model that made attention the larger part of a step, and padding-free batches no faster
than padded length-grouped ones (bench/RESULTS.md, issue 30). Flash-attention's varlen kernel
reads the row boundaries instead (TRL's collator passes them as cu_seq_lens_q); this is the same
idea for SDPA, which is what runs where flash-attention is not installed, CPUs included: one SDPA
call per row, each on the row's own block of the mask, so the result is the same computation.

Layer: train; imports torch and transformers only.
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("finetune")

NAME = "sdpa_packed_rows"  # "sdpa" in the name: transformers runs its SDPA support checks for it


def packed_rows_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *args, **kwargs):
    """transformers' SDPA attention, called once per packed row when the batch says where rows start.

    query/key/value: (batch, heads, tokens, head_dim). Without row boundaries (padded batches,
    generation with a cache, a batch of more than one sequence) this is transformers' SDPA as is."""
    starts = kwargs.get("cu_seq_lens_q")
    if (starts is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or kwargs.get("position_bias") is not None or starts.numel() <= 2):
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    bounds = starts.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1:]} does not cover the {query.shape[2]} packed tokens")
    plain = _plain_causal_rows(attention_mask, bounds)
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split, not one slice per row: its backward is one concatenation, where each slice's backward
    # would write its gradient into a zero tensor the size of the whole pack
    rows = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    outputs = []
    for row, ((q, k, v), start, end) in enumerate(zip(rows, bounds[:-1], bounds[1:])):
        # A row whose block of the model's mask is the plain causal triangle runs with SDPA's
        # is_causal and no mask (the flash kernel on GPUs); any other block (a sliding window
        # shorter than the row, chunks) is passed as it is, so the result stays exact.
        block = None if plain[row] else attention_mask[..., start:end, start:end]
        out, _ = sdpa_attention_forward(module, q, k, v, block, *args, **kwargs)
        outputs.append(out)  # (1, row tokens, heads, head_dim)
    return torch.cat(outputs, dim=1), None


_memo: dict = {}


def _plain_causal_rows(mask: torch.Tensor | None, bounds: list[int]) -> list[bool]:
    """Per packed row: whether the mask restricted to it is the causal triangle (True for every row
    without a mask: SDPA then runs each row causal). Checked once per mask: every layer of one
    attention kind gets the same mask object in a forward."""
    if mask is None:
        return [True] * (len(bounds) - 1)
    if _memo.get("bounds") == bounds and _memo["mask"]() is mask:
        return _memo["plain"]
    plain = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        block = mask[..., start:end, start:end]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=mask.device).tril()
        plain.append(block.dtype == torch.bool and bool((block == causal).all()))
    _memo.update(mask=weakref.ref(mask), bounds=bounds, plain=plain)
    return plain


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
    log.info("padding-free batches: SDPA runs once per packed row (%s), not over the whole packed sequence", NAME)
    return True
