"""Trainer arguments: our defaults for trl.SFTConfig / trl.DPOConfig, then the recipe's pass-through section.

    finetune validate RECIPE     # builds these arguments too, so TRL's own checks run before training
Layer: train; imports distributed, modeling, recipe, errors (trl inside trainer_args: `finetune
--help` and `validate`'s import stay fast, trl costs seconds to import).
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import distributed, modeling
from finetune.errors import UserError
from finetune.recipe import Recipe

# Checkpoints for --resume (finetune/runs/resume.py): every 100 optimizer steps (minutes to an hour of a
# Mixtral-8x7B run), the newest 2 kept so a kill during a save still leaves one complete checkpoint.
# A LoRA checkpoint is the adapter, its Adam moments and the RNG states: small next to the model.
CHECKPOINTS = {"save_strategy": "steps", "save_steps": 100, "save_total_limit": 2}

# SFT batches are padding-free: TRL's collator concatenates a batch's rows into one sequence with
# position ids restarting per row, and transformers builds the block-diagonal causal mask from
# them (flash-attention's varlen kernel on GPUs), so no compute goes to padding and no token
# attends across rows; the batches hold the same rows as padded ones, so training is the same
# computation (tests/unit/train/test_padding_free.py). Length-grouped sampling, the other way to
# avoid padding, changes which rows share a step and cost 0.03 exact match on the bundled tasks.
PADDING_FREE = {"padding_free": True}

STAGE_DEFAULTS = {
    # LoRA wants a larger learning rate than full fine-tuning; DPO a smaller one than SFT.
    "sft": {"learning_rate": 2e-4, "num_train_epochs": 1, "per_device_train_batch_size": 8, **PADDING_FREE,
            **CHECKPOINTS},
    "dpo": {"learning_rate": 5e-5, "num_train_epochs": 1, "per_device_train_batch_size": 8, "beta": 0.1, **CHECKPOINTS},
}


def best_checkpoint_args(stopping, kwargs: dict, section: dict) -> dict:
    """What transformers' EarlyStoppingCallback needs: the best checkpoint tracked and loaded at the
    end (for a PEFT model the Trainer loads the adapter of that checkpoint), evaluations when the
    checkpoints are saved (load_best_model_at_end requires the two strategies to match)."""
    metric = stopping.metric if stopping.metric.startswith("eval_") else f"eval_{stopping.metric}"
    mode = stopping.mode if stopping.mode != "auto" else ("min" if metric.endswith("loss") else "max")
    out = {"load_best_model_at_end": True, "metric_for_best_model": metric, "greater_is_better": mode == "max"}
    if "eval_strategy" not in section:
        out["eval_strategy"] = kwargs["save_strategy"]
    if "eval_steps" not in section and kwargs.get("save_strategy") == "steps":
        out["eval_steps"] = kwargs["save_steps"]
    return out


# Layer kinds whose attention keeps packed rows apart from position ids alone. Linear-attention
# layers (Qwen3-Next, Qwen3.5-MoE: gated delta nets with a causal convolution) need the
# causal-conv1d kernels for that and transformers refuses without them, so such models keep
# padded batches unless a recipe asks otherwise.
PACKABLE_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def packs_rows_apart(config) -> bool:
    """Whether padding-free batches are safe for this model (every layer kind in PACKABLE_LAYERS)."""
    kinds = getattr(modeling.text_config(config), "layer_types", None) or []
    return all(kind in PACKABLE_LAYERS for kind in kinds)


def trainer_args(recipe: Recipe, stage: str, staging: Path, aux_coef: float, has_eval: bool, config=None):
    """trl.SFTConfig / trl.DPOConfig: our defaults, then the recipe's pass-through section.

    The Trainer's checkpoints go to the run's staging directory (finetune/runs/staging.py)."""
    from trl import (  # trl costs seconds to import: `finetune --help` needs none
        DPOConfig,
        SFTConfig,
    )

    distributed.require_deepspeed()
    cls = SFTConfig if stage == "sft" else DPOConfig
    kwargs = dict(STAGE_DEFAULTS[stage])
    if config is not None and not packs_rows_apart(config):
        kwargs.pop("padding_free", None)
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
    if stage == "sft" and kwargs.get("padding_free") and not kwargs.get("packing"):
        # TRL refuses padding_free without packing while max_length is set (it would not truncate);
        # finetune/data/convert.py has applied data.max_length to every row already.
        kwargs["max_length"] = None
    if recipe.early_stopping:
        kwargs.update(best_checkpoint_args(recipe.early_stopping, kwargs, section))
    try:
        args = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{stage}: trl.{cls.__name__} rejects these settings: {exc}") from None
    distributed.check_launch(args)
    return args
