"""The router aux loss in SFT and DPO is the same: transformers' load_balancing_loss_func on the
router logits of the training forward, weighted by the recipe's `router.aux_loss_coef`.

SFT: the logged aux_loss equals the function on router logits captured by hooks on the routers
(finetune/moe.py's find_routers), and the first step's loss with coefficient c exceeds the loss
with coefficient 0 by c x aux (same data, seed and starting weights). DPO: at the first step the
policy is the reference, so the preference loss is exactly ln 2 and the rest is c x aux.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import recipe_file, sft_recipe
from transformers import TrainerCallback
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from finetune import runs
from finetune.moe import find_routers
from finetune.recipe import read_recipe
from finetune.stages.dpo import build_trainer
from finetune.stages.sft import run_sft
from finetune.validate import check
from finetune.validate.resolve import absolute

COEF = 0.5  # large, so the aux term is far above float noise in the loss difference
EXPERTS, TOP_K = 4, 2  # conftest.build_model's Mixtral


class RouterLogits(TrainerCallback):
    """Router logits (tokens, experts) of every training-mode forward, one tuple per forward."""

    def __init__(self):
        self.forwards: list[tuple] = []
        self._current: list = []

    def hook(self, module, inputs, out):
        logits = out[0] if isinstance(out, tuple) else out
        if module.training:  # the routing metrics' probe forwards run in eval mode
            self._current.append(logits.detach().reshape(-1, logits.shape[-1]))
            if len(self._current) == self.layers:
                self.forwards.append(tuple(self._current))
                self._current = []

    def attach(self, model):
        routers = find_routers(model)
        self.layers = len(routers)
        for r in routers:
            r.module.register_forward_hook(self.hook)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.attach(model)


def first_step(tmp_path, tiny_mixtral, sft_file, coef: float):
    capture = RouterLogits()
    recipe = sft_recipe(tmp_path / f"coef{coef}", tiny_mixtral, sft_file, router={"aux_loss_coef": coef},
                        sft={"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1})
    out = run_sft(read_recipe(recipe_file(tmp_path, f"sft{coef}.yaml", **recipe)), callbacks=[capture])
    log = next(e for e in runs.read_run(out).metrics["log_history"] if "loss" in e)
    return out, log, capture


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tiny_mixtral, sft_file):
    tmp = tmp_path_factory.mktemp("aux")
    return first_step(tmp, tiny_mixtral, sft_file, COEF), first_step(tmp, tiny_mixtral, sft_file, 0.0)


def test_sft_logs_the_load_balancing_loss_of_its_router_logits(sft_runs):
    (_, log, capture), (_, log_off, _) = sft_runs
    # one step of one micro-batch; gradient checkpointing (TRL's default) replays each layer, and
    # so its router, during backward, last layer first: the first forward is the one the loss used
    first, *replays = capture.forwards
    assert len(replays) <= 1 and all(torch.equal(a, b) for r in replays for a, b in zip(first, reversed(r)))
    # padding-free batches hold no padding: every token counts (attention_mask None)
    expected = load_balancing_loss_func(first, EXPERTS, TOP_K, None).item()
    assert log["aux_loss"] == pytest.approx(expected, rel=1e-6)
    assert "aux_loss" not in log_off  # coefficient 0: off, not computed
    assert log["loss"] - log_off["loss"] == pytest.approx(COEF * expected, rel=1e-4)


def test_dpo_adds_the_same_aux_loss(tmp_path, sft_runs, pref_file):
    (sft_run, _, _), _ = sft_runs
    path = recipe_file(tmp_path, "dpo.yaml", output_dir=str(tmp_path / "dpo"), from_run=str(sft_run),
                       data={"train": [str(pref_file)], "max_length": 64}, router={"aux_loss_coef": COEF},
                       lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
                       dpo={"max_steps": 1, "per_device_train_batch_size": 2})
    checked = check(read_recipe(path), "dpo")
    trainer, *_ = build_trainer(absolute(checked.recipe), checked, COEF, runs.read_run(sft_run))
    capture = RouterLogits()
    capture.attach(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    # the policy forward comes first; the reference forward (adapters disabled) follows
    expected = load_balancing_loss_func(capture.forwards[0], EXPERTS, TOP_K, batch["attention_mask"]).item()
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2) + COEF * expected, rel=1e-5)
    assert torch.is_tensor(loss) and loss.requires_grad
