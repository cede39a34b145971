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
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # The row's diagonal block of the model's mask keeps its sliding window or chunks exact;
        # without a mask SDPA runs the row causal, as it would the whole sequence.
        block = None if attention_mask is None else attention_mask[..., start:end, start:end]
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], block, *args, **kwargs)
        outputs.append(out)  # (1, row tokens, heads, head_dim)
    return torch.cat(outputs, dim=1), None


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
