"""Record what each MoE router decides during forward passes: hooks, no model changes.

    with RoutingCapture(model) as cap:          # mode="full": keep the last forward's routing
        model(input_ids=ids, attention_mask=mask)
    cap.last.topk[0]                            # (B, S, k) expert ids of the first MoE layer

    cap = RoutingCapture(model, mode="counts", train_only=True)   # training: counts only
    ...; cap.counts                             # (L, E) assignments over real tokens, on device

Used by `callback.py` (training) and `report.py` (`finetune routing ...`); tested by
tests/unit/routing/.
Layer: routing; imports moe.

Routers are found by finetune/moe.py's one rule (the same training and export use), through PEFT
wrappers (ModulesToSaveWrapper when the router is trained in full, LoRA's ParamWrapper for
`target_parameters=["mlp.gate.weight"]`). The outermost wrapper is hooked: its output is what the block uses, whichever adapter is active or disabled. Mixtral,
Qwen2-MoE, Qwen3-MoE and OLMoE routers in transformers 5 return (logits (T, E), weights (T, k),
indices (T, k)) with T = batch * seq; any router returning logits first and integer indices last
works. The padding mask comes from a forward pre-hook on the outermost transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from finetune.moe import Router, find_routers  # noqa: F401  (Router: the type of self.routers)
from finetune.routing.metrics import token_entropy


@dataclass
class Routing:
    """One forward pass: per MoE layer (in `layers` order), router logits and top-k expert ids."""

    layers: list[int]
    logits: list[Tensor]  # each (B, S, E), detached
    topk: list[Tensor]  # each (B, S, k), column 0 = first choice
    mask: Tensor  # (B, S) bool, True = real token
    starts: Tensor | None  # (B, S) bool, True where position_ids restart (packed rows)


def find_root(model: nn.Module) -> nn.Module:
    """The outermost transformers model (inside PeftModel/LoraModel), whose forward sees the batch."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return model


def _router_outputs(output, name: str) -> tuple[Tensor, Tensor]:
    """(logits (T, E), topk (T, k)) from a router's output tuple."""
    if isinstance(output, (tuple, list)) and len(output) >= 2:
        logits, topk = output[0], output[-1]
        if (
            isinstance(logits, Tensor)
            and isinstance(topk, Tensor)
            and logits.is_floating_point()
            and not topk.is_floating_point()
        ):
            return logits.detach(), topk.detach()
        scores = output[0]
        if (len(output) == 2 and isinstance(scores, Tensor) and isinstance(topk, Tensor) and scores.shape == topk.shape
                and scores.dim() == 2 and scores.is_floating_point()):
            # Llama-4: (scores, logits), scores the sigmoid of the top-k logits and exactly 0 elsewhere
            k = max(int((scores[:1] > 0).sum()), 1)
            return topk.detach(), topk.detach().topk(k, dim=-1).indices
    kind = type(output).__name__
    raise TypeError(
        f"router {name} returned {kind}; routing metrics need routers that return "
        "(logits, weights, top-k indices) like Mixtral/Qwen2-MoE/OLMoE in transformers 5"
    )


class RoutingCapture:
    """Hooks that record routing; a context manager (`with`) or `close()` when done.

    mode="full" keeps the last forward's `Routing` (report, drift probe). mode="counts" keeps only
    running on-device sums, batched over layers once per forward so training pays a handful of
    small kernels and no host sync: `counts` (L, E) assignments, `entropy_sum` (L,), `tokens` ().
    train_only=True ignores forwards that are not training forwards (eval, reference models
    under no_grad, the drift probe) and gradient-checkpointing recomputation in backward, since
    only forwards opened by the root's pre-hook are recorded.
    """

    def __init__(self, model: nn.Module, *, mode: str = "full", train_only: bool = False):
        if mode not in ("full", "counts"):
            raise ValueError(f"mode must be 'full' or 'counts', not {mode!r}")
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(
                f"no MoE routers found in {type(model).__name__}: routing metrics need a "
                "Mixture-of-Experts model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)"
            )
        self.root = find_root(model)
        self.layers = [r.layer for r in self.routers]
        self.mode, self.train_only = mode, train_only
        self.last: Routing | None = None
        self.last_inputs: dict[str, Tensor] | None = None  # the recorded forward's batch tensors
        self.counts = self.entropy_sum = self.tokens = None
        self._open = False
        self._mask = self._starts = None
        self._stash: dict[int, tuple[Tensor, Tensor]] = {}
        self._handles = [
            self.root.register_forward_pre_hook(self.on_forward_start, with_kwargs=True),
            self.root.register_forward_hook(self.on_forward_end, with_kwargs=True),
        ]
        for pos, router in enumerate(self.routers):
            self._handles.append(router.module.register_forward_hook(self.router_hook(pos, router.name)))

    def __enter__(self) -> RoutingCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset_counts(self) -> None:
        for t in (self.counts, self.entropy_sum, self.tokens):
            if t is not None:
                t.zero_()

    # --- hooks (public so a profiler can wrap them: bench/routing_overhead.py) ----------------------

    def on_forward_start(self, module, args, kwargs):
        self._stash = {}
        self._open = not self.train_only or (module.training and torch.is_grad_enabled())
        if not self._open:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape_of = ids if ids is not None else embeds
        if shape_of is None:
            self._open = False
            return
        batch, seq = shape_of.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and tuple(mask.shape) == (batch, seq):
            self._mask = mask.to(torch.bool)
        else:  # no mask, or a 4-D/custom one: every token counts
            self._mask = torch.ones(batch, seq, dtype=torch.bool, device=shape_of.device)
        pos = kwargs.get("position_ids")
        self._starts = pos == 0 if isinstance(pos, Tensor) and tuple(pos.shape) == (batch, seq) else None
        # Kept for the callback's drift probe; only (B, S) tensors, which slice along batch and sequence.
        self.last_inputs = {
            k: v
            for k, v in {"input_ids": ids, "attention_mask": mask, "position_ids": pos}.items()
            if isinstance(v, Tensor) and tuple(v.shape) == (batch, seq)
        }

    def router_hook(self, pos: int, name: str):
        def hook(module, args, output):
            if self._open:
                self._stash[pos] = _router_outputs(output, name)

        return hook

    def on_forward_end(self, module, args, kwargs, output):
        if not self._open:
            return
        self._open = False
        stash, self._stash = self._stash, {}
        if not stash:
            return
        batch, seq = self._mask.shape
        positions = sorted(stash)
        logits = [stash[p][0] for p in positions]
        topk = [stash[p][1] for p in positions]
        if any(t.shape[0] != batch * seq for t in topk):  # a router that drops tokens: no mask
            raise ValueError("router outputs do not have one row per input token; cannot align padding")
        if self.mode == "full":
            self.last = Routing(
                [self.layers[p] for p in positions],
                [x.reshape(batch, seq, -1) for x in logits],
                [x.reshape(batch, seq, -1) for x in topk],
                self._mask,
                self._starts,
            )
        else:
            self._accumulate(positions, torch.stack(logits), torch.stack(topk))

    def _accumulate(self, positions: list[int], logits: Tensor, topk: Tensor) -> None:
        """Add one forward's routing (L', T, E) / (L', T, k) to the on-device sums."""
        n_layers, n_tokens, top_k = topk.shape
        num_experts = logits.shape[-1]
        if self.counts is None:
            dev = logits.device
            self.counts = torch.zeros(len(self.routers), num_experts, device=dev)
            self.entropy_sum = torch.zeros(len(self.routers), device=dev)
            self.tokens = torch.zeros((), device=dev)
        w = self._mask.reshape(-1).to(self.counts.dtype)  # (T,)
        # One scatter for all layers: offset each layer's expert ids into its own row.
        offsets = torch.arange(n_layers, device=topk.device).mul_(num_experts).view(-1, 1, 1)
        flat_ids = (topk.long() + offsets).reshape(-1)
        flat_w = w.view(1, -1, 1).expand(n_layers, n_tokens, top_k).reshape(-1)
        layer_counts = torch.zeros(n_layers * num_experts, device=self.counts.device)
        layer_counts.index_add_(0, flat_ids, flat_w)
        # masked_fill, not * w: padding rows that attend to nothing can carry NaN logits.
        entropy = token_entropy(logits).masked_fill(~self._mask.reshape(1, -1), 0).sum(-1)  # (L',)
        if len(positions) == len(self.routers):
            self.counts += layer_counts.view(n_layers, num_experts)
            self.entropy_sum += entropy
        else:
            for i, p in enumerate(positions):
                self.counts[p] += layer_counts.view(n_layers, num_experts)[i]
                self.entropy_sum[p] += entropy[i]
        self.tokens += w.sum()
