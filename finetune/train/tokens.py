"""Tokens fed to the model in training and how many of them were padding: what batching saved.

    finetune sft recipes/tiny-moe/sft.yaml     # the summary's "padding" line; metrics.json `tokens_fed`
    python bench/sft_batching.py               # padding-free vs padded batches

A forward pre-hook on the model counts, for training forwards only (module in training mode,
gradients on: not eval, not DPO's reference pass), every input token and the padding ones (zeros
of a 2-D attention mask; padding-free batches have none). The padding count stays on the device
(no host sync per step) and is read once after training.
Layer: train.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class TokenCounter(TrainerCallback):
    def __init__(self):
        self.tokens = 0
        self.padding = None  # a device tensor once a padded batch is seen
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._handle is None:
            self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            return
        self.tokens += ids.numel()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            pad = (mask == 0).sum()
            self.padding = pad if self.padding is None else self.padding + pad

    def summary(self) -> dict:
        padding = int(self.padding) if self.padding is not None else 0
        return {"tokens_fed": self.tokens, "padding_tokens": padding,
                "padding_share": padding / self.tokens if self.tokens else 0.0}
