"""Train, save and check the adapter, write the run files, print the summary.

    finetune sft RECIPE      # the last step of stages/sft.py and stages/dpo.py
Layer: train; imports distributed, runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from finetune import distributed
from finetune.recipe import Recipe
from finetune.runs import diskspace, signals
from finetune.runs import staging as rundirs
from finetune.runs.adapter_card import write_adapter_card
from finetune.runs.adapter_check import check_saved_adapter
from finetune.runs.resume import RunTotalsCallback, newest_checkpoint
from finetune.train.preempt import PreemptionCallback
from finetune.train.tokens import TokenCounter

DATA_REPORT = "data_report.json"


def final_losses(log_history: list[dict]) -> dict:
    out = {}
    for entry in log_history:
        for key in ("loss", "eval_loss", "train_loss", "rewards/accuracies", "eval_rewards/accuracies", "aux_loss"):
            if key in entry:
                out[key] = entry[key]
    return out


def early_stopping_summary(state, recipe: Recipe) -> dict | None:
    """Which checkpoint's adapter the run keeps (the Trainer loaded the best one at the end)."""
    if not recipe.early_stopping:
        return None
    best = state.best_model_checkpoint
    return {
        "metric": recipe.early_stopping.metric,
        "best_step": int(Path(best).name.rpartition("-")[2]) if best else None,
        "best_metric": state.best_metric,
        "last_step": state.global_step,
        "stopped_early": state.global_step < state.max_steps,
    }


def print_summary(stage: str, out: Path, metrics: dict) -> None:
    lines = [f"\n{stage.upper()} finished in {metrics['seconds']:.0f}s"]
    groups = metrics["trainable_parameters"]
    lines.append("  trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()) + f" (total {sum(groups.values()):,})")
    lines.append(f"  tokens seen: {metrics.get('tokens_seen', 0):,}")
    fed = metrics.get("tokens_fed")
    if fed:
        lines.append(f"  padding: {metrics['padding_tokens']:,} of {fed:,} tokens fed ({metrics['padding_share']:.1%})")
    losses = metrics.get("final", {})
    if losses:
        lines.append("  final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in losses.items()))
    lines.append(f"  router: {metrics['router_policy']}, aux_loss_coef {metrics['router_aux_loss_coef']}")
    stop = metrics.get("early_stopping")
    if stop:
        how = f"stopped early at step {stop['last_step']}" if stop["stopped_early"] else f"ran all {stop['last_step']} steps"
        best = (f"adapter from the best checkpoint, step {stop['best_step']} ({stop['metric']} {stop['best_metric']:.4g})"
                if stop["best_step"] is not None else "no checkpoint was evaluated: adapter of the last step")
        lines.append(f"  early stopping: {how}; {best}")
    if metrics.get("dropped_rows"):
        lines.append(f"  dropped rows: {metrics['dropped_rows']}")
    lines.append(f"  outputs: {out}")
    print("\n".join(lines), flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def model_state_for_save(trainer) -> dict:
    """The model state dict the adapter is cut from (PEFT keeps only the adapter's tensors).

    Called on every rank. One process or DDP: the model's own tensors, no copy. Sharded training
    (FSDP2, ZeRO-3): the adapter tensors gathered on every rank (a collective) before rank 0 writes.
    """
    gathered = distributed.adapter_state_dict(trainer)
    return gathered if gathered is not None else trainer.model.state_dict()


def train_and_save(stage: str, trainer, tokenizer, rundir: rundirs.RunDir, recipe: Recipe, checked, counts: dict,
                   report, parent_chain: list[dict], **extra_metrics) -> Path | None:
    """Train (resuming if asked), save and check the adapter, write the run files, swap the run into place.

    Runs inside rundirs.claimed(...): any failure leaves the previous run at output_dir untouched.
    """
    totals = RunTotalsCallback(trainer)
    trainer.add_callback(totals)
    fed = TokenCounter()  # padding-free batches feed none; padded ones show what they waste
    trainer.add_callback(fed)
    checkpoints = Path(trainer.args.output_dir)
    fix = "free space there (or point output_dir elsewhere) and continue with --resume"
    preempt = PreemptionCallback(disk_check=lambda: diskspace.shortfall(
        checkpoints, diskspace.checkpoint_bytes(trainer.model, trainer.optimizer), "the next checkpoint", fix))
    trainer.add_callback(preempt)
    if rundir.resume_from is not None:
        totals.restore(rundir.resume_from)
    with Timer() as timer:
        try:
            trainer.train(resume_from_checkpoint=str(rundir.resume_from) if rundir.resume_from else None)
        except Exception as exc:
            if diskspace.is_full(exc):  # another process filled the disk after the check
                raise diskspace.full_error(checkpoints, "a checkpoint", None, diskspace.free_bytes(checkpoints)[1], fix) from None
            raise
    if preempt.signum is not None:
        signals.take_pending()
        raise signals.Interrupted(preempt.signum, checkpoint=str(newest_checkpoint(checkpoints)))
    totals.fix_train_loss(trainer.state)
    distributed.log_peak_memory(trainer)
    state = model_state_for_save(trainer)  # on every rank: gathering sharded weights needs them all
    if not trainer.is_world_process_zero():
        return None
    staging = rundir.staging
    try:
        return _save_run(stage, trainer, tokenizer, rundir, recipe, checked, counts, report, parent_chain, state,
                         timer, totals, fed, extra_metrics)
    except Exception as exc:  # safetensors reports a full disk as a SafetensorError
        if diskspace.is_full(exc):
            raise diskspace.full_error(staging, "the finished run", None, diskspace.free_bytes(staging)[1],
                                       "free space there and continue with --resume") from None
        raise


def _save_run(stage, trainer, tokenizer, rundir, recipe, checked, counts, report, parent_chain, state, timer, totals,
              fed, extra_metrics) -> Path:
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
        **fed.summary(),  # this session's forwards (a resumed run: since the resume)
        "rows": report.rows,
        "dropped_rows": len(report.dropped),
        "router_policy": checked.targets.router_policy,
        "router_aux_loss_coef": recipe.router.aux_loss_coef,
        "resumed_from": str(rundir.resume_from.name) if rundir.resume_from else None,
        **extra_metrics,
        "early_stopping": early_stopping_summary(trainer.state, recipe),
        "final": final_losses(trainer.state.log_history),
        "log_history": trainer.state.log_history,
    }
    # what each data source gave (format, usable rows, rows used by the mixture): finetune/data/mixture.py
    (staging / DATA_REPORT).write_text(json.dumps({"sources": report.sources}, indent=1) + "\n")
    rundirs.finish(rundir, recipe, stage, parent_chain, metrics)
    print_summary(stage, rundir.out, metrics)
    return rundir.out
