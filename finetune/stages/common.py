"""What the SFT and DPO stages share: trainer arguments, the LoRA wrap, the aux loss, the summary.

Each stage (finetune/stages/sft.py, dpo.py) is one readable function that calls these in order.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import torch

from finetune import distributed, modeling
from finetune.runs import staging as rundirs
from finetune.runs.adapter_check import check_saved_adapter
from finetune.export.adapter_card import write_adapter_card
from finetune.errors import UserError
from finetune.lora import Plan, trainable_by_group, verify_adapters
from finetune.recipe import Recipe

log = logging.getLogger("finetune")

# PEFT checks rank/alpha pattern keys against module names only, so the keys for expert and
# router parameters (target_parameters) are reported as unmatched although PEFT applies them;
# tests/test_sft.py checks the ranks that expert adapters actually get.
warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")

# Checkpoints for --resume (finetune/runs/resume.py): every 100 optimizer steps (minutes to an hour of a
# Mixtral-8x7B run), the newest 2 kept so a kill during a save still leaves one complete checkpoint.
# A LoRA checkpoint is the adapter, its Adam moments and the RNG states: small next to the model.
CHECKPOINTS = {"save_strategy": "steps", "save_steps": 100, "save_total_limit": 2}

STAGE_DEFAULTS = {
    # LoRA wants a larger learning rate than full fine-tuning; DPO a smaller one than SFT.
    "sft": {"learning_rate": 2e-4, "num_train_epochs": 1, "per_device_train_batch_size": 8, **CHECKPOINTS},
    "dpo": {"learning_rate": 5e-5, "num_train_epochs": 1, "per_device_train_batch_size": 8, "beta": 0.1, **CHECKPOINTS},
}


def resolved_recipe(recipe: Recipe, stage: str):
    """(checked, recipe as the run records it): validated, local paths absolute, and the router
    aux-loss coefficient actually used. What run_sft/run_dpo train with, and what `pipeline
    --resume` compares a finished run's recipe.yaml with."""
    from finetune.validate import check

    checked = check(recipe, stage)
    out = absolute(checked.recipe)
    out.router.aux_loss_coef = resolve_aux_coef(out, checked.config)
    return checked, out


def resolve_aux_coef(recipe: Recipe, config) -> float:
    """The router aux-loss coefficient: the recipe's, else the model config's, else 0 (dense)."""
    if recipe.router.aux_loss_coef is not None:
        return float(recipe.router.aux_loss_coef)
    return float(getattr(modeling.text_config(config), "router_aux_loss_coef", 0.0) or 0.0)


def absolute(recipe: Recipe) -> Recipe:
    """The recipe with local paths made absolute, so the run directory works from anywhere."""
    out = copy.deepcopy(recipe)

    def fix(p: str) -> str:
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    out.model.name_or_path = fix(out.model.name_or_path)
    if out.model.chat_template and out.model.chat_template.endswith(".jinja"):
        out.model.chat_template = fix(out.model.chat_template)
    out.data.train = [fix(p) for p in out.data.train]
    out.data.eval = [fix(p) for p in out.data.eval]
    out.output_dir = str(Path(out.output_dir).resolve())
    if out.from_run:
        out.from_run = fix(out.from_run)
    return out


def trainer_args(recipe: Recipe, stage: str, staging: Path, aux_coef: float, has_eval: bool):
    """trl.SFTConfig / trl.DPOConfig: our defaults, then the recipe's pass-through section.

    The Trainer's checkpoints go to the run's staging directory (finetune/runs/staging.py)."""
    from trl import DPOConfig, SFTConfig

    distributed.require_deepspeed()
    cls = SFTConfig if stage == "sft" else DPOConfig
    kwargs = dict(STAGE_DEFAULTS[stage])
    kwargs.update(
        output_dir=str(staging / "checkpoints"),
        seed=recipe.seed,
        max_length=recipe.data.max_length,
        router_aux_loss_coef=aux_coef,
        report_to="none",
        logging_steps=10,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        eval_strategy="epoch" if has_eval else "no",
    )
    if not torch.cuda.is_available():
        # TRL 1.x defaults to bf16 autocast, which CPUs run slowly or not at all. use_cpu would
        # make accelerate skip DeepSpeed, which picks its own accelerator (CPU here): not for it.
        kwargs.update(use_cpu=distributed.requested() not in ("zero3", "deepspeed"), bf16=False)
    else:
        kwargs.update(bf16=modeling.resolve_dtype(recipe.model.dtype) == torch.bfloat16)
    section = getattr(recipe, stage)
    if section.get("resume_from_checkpoint"):
        # The Trainer ignores this field (only train(resume_from_checkpoint=...) resumes): say so.
        raise UserError(f"{stage}.resume_from_checkpoint: not used; continue an interrupted run with "
                        f"`finetune {stage} RECIPE --resume` (it finds the newest complete checkpoint itself)")
    kwargs.update(section)
    try:
        args = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{stage}: trl.{cls.__name__} rejects these settings: {exc}") from None
    distributed.check_launch(args)
    return args


def announce_router(plan: Plan, aux_coef: float) -> None:
    log.info("router aux loss coefficient %g (policy: %s)", aux_coef, plan.router_policy)
    if plan.router_policy == "freeze" and aux_coef > 0 and plan.router_modules:
        log.warning(
            "router frozen with router.aux_loss_coef=%g: the load-balancing loss still trains, but its gradient "
            "reaches only the layers upstream of each router (through the hidden states), not the router itself",
            aux_coef,
        )


def finish_wrap(trainer, plan: Plan, expert_path: str) -> dict[str, int]:
    """Check the PEFT-wrapped model trains what the plan says; switch experts to the fast path;
    check and prepare the sharding the launcher asked for (finetune/distributed.py)."""
    model = trainer.model
    verify_adapters(model, plan)
    distributed.prepare(trainer)
    if "experts" in plan.groups and expert_path == "fast":
        from finetune.expert_lora import enable_fast_expert_lora

        patched = enable_fast_expert_lora(model)
        log.info("fast expert LoRA on %d MoE layers", patched)
    counts = trainable_by_group(model)
    log.info("trainable parameters by group: %s", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return counts


def final_losses(log_history: list[dict]) -> dict:
    out = {}
    for entry in log_history:
        for key in ("loss", "eval_loss", "train_loss", "rewards/accuracies", "eval_rewards/accuracies", "aux_loss"):
            if key in entry:
                out[key] = entry[key]
    return out


def print_summary(stage: str, out: Path, metrics: dict) -> None:
    lines = [f"\n{stage.upper()} finished in {metrics['seconds']:.0f}s"]
    groups = metrics["trainable_parameters"]
    lines.append("  trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()) + f" (total {sum(groups.values()):,})")
    lines.append(f"  tokens seen: {metrics.get('tokens_seen', 0):,}")
    losses = metrics.get("final", {})
    if losses:
        lines.append("  final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in losses.items()))
    lines.append(f"  router: {metrics['router_policy']}, aux_loss_coef {metrics['router_aux_loss_coef']}")
    if metrics.get("dropped_rows"):
        lines.append(f"  dropped rows: {metrics['dropped_rows']}")
    lines.append(f"  outputs: {out}")
    print("\n".join(lines), flush=True)


def seed_everything(seed: int) -> None:
    """Seed before the trainer is built: TRL creates the PEFT model (random LoRA A) in its __init__,
    before transformers' Trainer seeds, so without this two runs of one recipe differ."""
    from transformers import set_seed

    set_seed(seed)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def attach_routing_metrics(trainer, rundir: rundirs.RunDir) -> None:
    """Expert load, entropy, dead experts and drift in the trainer's own logs (finetune/routing/callback.py).

    Attached after the trainer is built so the metrics reach TensorBoard/trackio/W&B too. The drift
    baseline is kept in the staging directory, so a resumed run compares with its true start.
    """
    from finetune.routing.callback import add_routing_metrics

    add_routing_metrics(trainer, baseline_dir=rundir.staging)


def train_and_save(stage: str, trainer, tokenizer, rundir: rundirs.RunDir, recipe: Recipe, checked, counts: dict,
                   report, parent_chain: list[dict], **extra_metrics) -> Path | None:
    """Train (resuming if asked), save and check the adapter, write the run files, swap the run into place.

    Runs inside rundirs.claimed(...): any failure leaves the previous run at output_dir untouched.
    """
    from finetune.runs.resume import RunTotalsCallback

    totals = RunTotalsCallback(trainer)
    trainer.add_callback(totals)
    if rundir.resume_from is not None:
        totals.restore(rundir.resume_from)
    with Timer() as timer:
        trainer.train(resume_from_checkpoint=str(rundir.resume_from) if rundir.resume_from else None)
    totals.fix_train_loss(trainer.state)
    distributed.log_peak_memory(trainer)
    state = rundirs.model_state_for_save(trainer)  # on every rank: gathering sharded weights needs them all
    if not trainer.is_world_process_zero():
        return None
    staging = rundir.staging
    # only the trained adapter: a 4-bit DPO run also holds the frozen SFT adapter as `ref`
    trainer.model.save_pretrained(staging, state_dict=state, selected_adapters=["default"])
    tokenizer.save_pretrained(staging)
    check_saved_adapter(staging, checked.config, recipe.model.trust_remote_code)
    write_adapter_card(staging, stage, parent_chain + [{"kind": stage, "run": str(rundir.out)}])
    metrics = {
        "stage": stage,
        # a resumed run: its whole training time, the sessions before included (to their checkpoint)
        "seconds": timer.seconds + totals.seconds_before,
        "seconds_before_resume": totals.seconds_before if rundir.resume_from else None,
        "world_size": trainer.args.world_size,
        "trainable_parameters": counts,
        "tokens_seen": int(getattr(trainer, "_total_train_tokens", 0)),
        "rows": report.rows,
        "dropped_rows": len(report.dropped),
        "router_policy": checked.plan.router_policy,
        "router_aux_loss_coef": recipe.router.aux_loss_coef,
        "resumed_from": str(rundir.resume_from.name) if rundir.resume_from else None,
        **extra_metrics,
        "final": final_losses(trainer.state.log_history),
        "log_history": trainer.state.log_history,
    }
    rundirs.finish(rundir, recipe, stage, parent_chain, metrics)
    print_summary(stage, rundir.out, metrics)
    return rundir.out
