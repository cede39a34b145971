"""Routing metrics in the training logs of TRL's SFTTrainer and DPOTrainer.

    trainer = SFTTrainer(...)            # or DPOTrainer
    add_routing_metrics(trainer)         # before trainer.train()

At every logging step the trainer's logs (and so TensorBoard / trackio / W&B, and
`trainer.state.log_history`) gain, per MoE decoder layer L, over the real (non-padding) tokens
of the training forwards since the previous log:

    routing/layerL/expertE_share   share of the layer's top-k assignments that went to expert E
    routing/layerL/imbalance       max share / mean share;  routing/layerL/cv  std / mean
    routing/layerL/entropy         mean router entropy (nats; log E is uniform)
    routing/layerL/dead_experts    experts that got no token in the window
    routing/layerL/topk_overlap    drift from the starting model: mean |topk_start ∩ topk_now| / k
    routing/layerL/kl              drift: mean KL(p_start || p_now) of the router softmax

plus summaries over layers: routing/imbalance_max, routing/entropy_mean, routing/dead_experts,
routing/topk_overlap_min, routing/kl_max, and routing/tokens (real tokens counted in the window).
Definitions: metrics.py. `python bench/routing_overhead.py` measures the cost;
tests/unit/routing/test_routing_callback.py runs it in SFTTrainer and DPOTrainer.

Cost. Counting happens in hooks on the routers and the model (capture.py): once per training
forward, a few small kernels over (layers, tokens, experts) into on-device sums; nothing moves
to the host until a logging step. Reference-model forwards (DPO, under no_grad), evaluation and
gradient-checkpointing recomputation are not counted.

Drift. The starting model's routing is taken once, on a fixed probe (the first training batch,
cut to `probe_tokens`), at the first optimizer step before the weights change; each logging
step re-runs the current model on the same probe (eval mode, no_grad) and compares. One short
forward per logging window. Why not the alternatives: a snapshot of the router weights misses
the main effect under LoRA, where the router is frozen but its input hidden states move with the
attention/expert adapters; `disable_adapter()` gives the base model, which is the wrong start
when DPO continues from an SFT adapter, and needs a PeftModel.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from finetune import distributed
from finetune.routing.capture import RoutingCapture
from finetune.routing.metrics import dead_experts, imbalance, load_share, masked_mean, token_kl, token_topk_overlap

log = logging.getLogger(__name__)


def add_routing_metrics(trainer, *, console_per_layer: bool = False, **options) -> RoutingMetricsCallback:
    """Add a RoutingMetricsCallback first in `trainer`'s callbacks and return it.

    First, because the Trainer hands one `logs` dict to the callbacks in order and the reporters
    (TensorBoard, W&B, trackio) come early: a callback appended (`callbacks=[...]`) only reaches
    `state.log_history`. Unless `console_per_layer`, per-layer keys are taken out again just before
    the console printer, which would otherwise print hundreds of them per log for Mixtral-8x7B;
    the routing/* summaries stay on the console.
    """
    callback = RoutingMetricsCallback(**options)
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(0, callback)
    if not console_per_layer:
        printers = [i for i, c in enumerate(callbacks) if isinstance(c, (PrinterCallback, ProgressCallback))]
        callbacks.insert(printers[0] if printers else len(callbacks), _HidePerLayerKeys(callback.prefix))
    return callback


class _HidePerLayerKeys(TrainerCallback):
    """Drops `<prefix>/layer*` keys from `logs` after the reporters have seen them."""

    def __init__(self, prefix: str):
        self.start = f"{prefix}/layer"

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in [k for k in logs or () if k.startswith(self.start)]:
            del logs[key]


class RoutingMetricsCallback(TrainerCallback):
    """Per-layer routing metrics at each logging step; see the module docstring.

    per_expert: log each expert's share (E keys per layer; off for very wide models).
    drift: log top-k overlap and KL against the starting model on a fixed probe batch.
    probe_tokens: size of that probe (whole rows of the first batch, at least one, cut to fit).
    A model without MoE routers (dense Mistral) makes the callback a no-op, with one warning.
    """

    def __init__(
        self, *, per_expert: bool = True, drift: bool = True, probe_tokens: int = 256, prefix: str = "routing",
        baseline_dir=None,
    ):
        self.per_expert, self.drift, self.probe_tokens, self.prefix = per_expert, drift, probe_tokens, prefix
        # Where the starting model's probe routing is kept (one file per rank), so that a resumed run
        # measures drift against the true start, not against the checkpoint it resumed from.
        self.baseline_dir = baseline_dir
        self.capture: RoutingCapture | None = None
        self.probe: dict | None = None
        self.start_routing = None  # Routing of the starting model on the probe
        self._model = None  # the trainer's model: the probe runs through it

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.capture is not None:  # train() called again on the same trainer
            self.capture.close()
        self._model = model
        try:
            self.capture = RoutingCapture(model, mode="counts", train_only=True)
        except ValueError as err:
            log.warning("routing metrics off: %s", err)
            self.capture = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Before the first update the weights are the starting model's: route the probe now.
        if self.capture is None or not self.drift or self.start_routing is not None:
            return
        baseline = Path(self.baseline_dir) / f"routing_baseline_{args.process_index}.pt" if self.baseline_dir else None
        if baseline is not None and baseline.is_file():
            # "cpu:0" (DDP on CPU) is not a location torch.load knows; plain "cpu" is.
            device = "cpu" if args.device.type == "cpu" else args.device
            saved = torch.load(baseline, weights_only=False, map_location=device)
            self.probe, self.start_routing = saved["probe"], saved["start"]
            return
        inputs = self.capture.last_inputs
        if not inputs or "input_ids" not in inputs:
            return
        batch, seq = inputs["input_ids"].shape
        rows, cols = max(1, min(batch, self.probe_tokens // max(seq, 1))), min(seq, self.probe_tokens)
        mask = inputs.get("attention_mask")
        # Cut long rows on the side that holds the text (TRL pads right; left padding is possible).
        cut = slice(seq - cols, seq) if mask is not None and not bool(mask[:rows, 0].all()) else slice(0, cols)
        self.probe = {k: v[:rows, cut].detach().clone() for k, v in inputs.items()}
        self.start_routing = self._route_probe()
        if baseline is not None and baseline.parent.is_dir():
            torch.save({"probe": self.probe, "start": self.start_routing}, baseline)
        if not bool(self.start_routing.mask.any()):
            log.warning("routing drift off: the probe batch has no real tokens", extra=distributed.PER_RANK)  # each rank's own batch
            self.drift = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.capture is None or logs is None or self.capture.counts is None:
            return
        if any(k.startswith("eval_") for k in logs):  # evaluation logs: keep the training window open
            return
        metrics = self._window_metrics()
        if not metrics:  # nothing trained since the last log (e.g. the end-of-training summary)
            return
        if self.drift and self.start_routing is not None:
            metrics.update(self._drift_metrics())
        logs.update(metrics)
        # Trainer.log stored a copy of `logs` in log_history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.capture is not None:
            self.capture.close()

    # --- metrics -------------------------------------------------------------------------------

    def _window_metrics(self) -> dict[str, float]:
        cap = self.capture
        sums = torch.cat([cap.counts.flatten(), cap.entropy_sum, cap.tokens.view(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # every rank logs the same global window
        sums = sums.cpu()  # the one host sync, once per logging step
        cap.reset_counts()
        n_layers, n_experts = cap.counts.shape
        counts = sums[: n_layers * n_experts].view(n_layers, n_experts)
        entropy, tokens = sums[n_layers * n_experts : -1], float(sums[-1])
        if tokens == 0:
            return {}
        p, out = self.prefix, {}
        worst, dead_total = 0.0, 0
        for i, layer in enumerate(cap.layers):
            if self.per_expert:
                for e, share in enumerate(load_share(counts[i]).tolist()):
                    out[f"{p}/layer{layer}/expert{e}_share"] = share
            ratio, cv = imbalance(counts[i])
            dead = len(dead_experts(counts[i]))
            out[f"{p}/layer{layer}/imbalance"] = ratio
            out[f"{p}/layer{layer}/cv"] = cv
            out[f"{p}/layer{layer}/entropy"] = float(entropy[i]) / tokens
            out[f"{p}/layer{layer}/dead_experts"] = dead
            worst, dead_total = max(worst, ratio), dead_total + dead
        out[f"{p}/imbalance_max"] = worst
        out[f"{p}/entropy_mean"] = float(entropy.sum()) / tokens / n_layers
        out[f"{p}/dead_experts"] = dead_total
        out[f"{p}/tokens"] = tokens
        return out

    def _route_probe(self):
        root = self.capture.root
        extra = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(root.forward).parameters:
            extra["logits_to_keep"] = 1  # the LM head over the whole probe is wasted work here
        was_training = root.training
        root.eval()  # no dropout or router jitter: start and now must differ only by the weights
        # Through the trainer's (outermost) model, not `root`: under FSDP2 the outermost module is
        # the root FSDP unit whose hooks gather the weights the inner model needs (calling the
        # inner model mixes Tensors and DTensors); under ZeRO-3 its hooks do the same. Every rank
        # runs the probe (on_log and on_pre_optimizer_step run on all), as sharding requires.
        runner = self._model if self._model is not None else root
        try:
            with torch.no_grad(), RoutingCapture(root, mode="full") as cap:
                runner(**self.probe, **extra)
        finally:
            root.train(was_training)
        return cap.last

    def _drift_metrics(self) -> dict[str, float]:
        now, start, p = self._route_probe(), self.start_routing, self.prefix
        overlaps = [masked_mean(token_topk_overlap(a, b), start.mask) for a, b in zip(start.topk, now.topk)]
        kls = [masked_mean(token_kl(a, b), start.mask) for a, b in zip(start.logits, now.logits)]
        out = {}
        for layer, overlap, kl in zip(start.layers, overlaps, kls):
            out[f"{p}/layer{layer}/topk_overlap"] = overlap
            out[f"{p}/layer{layer}/kl"] = kl
        out[f"{p}/topk_overlap_min"] = min(overlaps)
        out[f"{p}/kl_max"] = max(kls)
        return out
