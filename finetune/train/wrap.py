"""After the trainer is built: the LoRA wrap checked, the fast expert path switched on, routing metrics attached.

    finetune sft RECIPE      # stages/sft.py and stages/dpo.py call these in order
Layer: train; imports lora, routing (sibling), balancing, distributed, runs, recipe.
"""

from __future__ import annotations

import logging

from transformers import set_seed

from finetune import distributed
from finetune.balancing import Balancing
from finetune.lora.fast_experts import enable_fast_expert_lora
from finetune.lora.targets import Targets, check_wrapped, trainable_by_group
from finetune.recipe import Recipe
from finetune.routing.callback import add_routing_metrics
from finetune.runs import staging as rundirs
from finetune.train import console, loggers, samples

log = logging.getLogger("finetune")


def seed_everything(seed: int) -> None:
    """Seed before the trainer is built: TRL creates the PEFT model (random LoRA A) in its __init__,
    before transformers' Trainer seeds, so without this two runs of one recipe differ."""
    set_seed(seed)


def announce_router(targets: Targets, aux_coef: float, balance: Balancing | None = None) -> None:
    if balance is None:
        log.info("router aux loss coefficient %g (policy: %s)", aux_coef, targets.router_policy)
    else:
        log.info("router %s (%s); %s", targets.router_policy, balance.policy_note(targets.router_policy),
                 balance.summary(aux_coef))
    if targets.router_policy == "freeze" and aux_coef > 0 and targets.router_modules:
        log.warning(
            "router frozen with router.aux_loss_coef=%g: the load-balancing loss still trains, but its gradient "
            "reaches only the layers upstream of each router (through the hidden states), not the router itself",
            aux_coef,
        )


def finish_wrap(trainer, targets: Targets, expert_path: str) -> dict[str, int]:
    """Check the PEFT-wrapped model trains the resolved targets; switch experts to the fast path;
    check and prepare the sharding the launcher asked for (finetune/distributed.py)."""
    model = trainer.model
    check_wrapped(model, targets)
    distributed.prepare(trainer)
    if "experts" in targets.groups and expert_path == "fast":
        patched = enable_fast_expert_lora(model)
        log.info("fast expert LoRA on %d MoE layers", patched)
    counts = trainable_by_group(model, targets)
    log.info("trainable parameters by group: %s", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return counts


def attach_routing_metrics(trainer, rundir: rundirs.RunDir) -> None:
    """Expert load, entropy, dead experts and drift in the trainer's own logs (finetune/routing/callback.py).

    Attached after the trainer is built so the metrics reach TensorBoard/trackio/W&B too. The drift
    baseline is kept in the staging directory, so a resumed run compares with its true start.
    """
    add_routing_metrics(trainer, baseline_dir=rundir.staging)


def attach_watchers(trainer, recipe: Recipe, rundir: rundirs.RunDir, tokenizer) -> None:
    """What a person watches: the console line (console.py), the loggers pointed at <run>/logs
    (loggers.py), sample answers (samples.py) and early stopping (transformers' EarlyStoppingCallback;
    trainer_args asked for the best checkpoint to be tracked and loaded at the end)."""
    from transformers import EarlyStoppingCallback  # beside the Trainer, which the stages have loaded

    console.install(trainer)
    loggers.configure(trainer, rundir.staging, rundir.resume_from)
    samples.install(trainer, recipe.samples, recipe.data.eval, tokenizer, rundir.staging, recipe.data.system)
    if recipe.early_stopping:
        stop = recipe.early_stopping
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=stop.patience,
                                                   early_stopping_threshold=stop.threshold))
