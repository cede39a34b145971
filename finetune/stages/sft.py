"""Supervised fine-tuning: train LoRA adapters on chat data with TRL's SFTTrainer.

    finetune sft recipes/tiny-moe/sft.yaml [--set sft.learning_rate=1e-4 ...] [--overwrite] [--resume]
    accelerate launch -m finetune sft recipes/mixtral-8x7b/sft.yaml   # several GPUs

Writes the run directory described in finetune/runs/__init__.py.
Layer: stages. Everything that can fail on the inputs
(recipe, data, trainer settings, output directory, model load) is checked before the staging
directory is created (finetune/runs/staging.py).
"""

from __future__ import annotations

import logging

from finetune import balancing, distributed, modeling
from finetune.data.prep import build_datasets, wants_eval
from finetune.guards import NonFiniteGuard
from finetune.load import load_model
from finetune.lora.targets import lora_config
from finetune.recipe import Recipe
from finetune.runs import faults, staging
from finetune.train import args as train_args
from finetune.train import packed_attention, save, wrap
from finetune.validate.resolve import resolved_recipe

log = logging.getLogger("finetune")


def run_sft(recipe: Recipe, overwrite: bool = False, callbacks=(), resume: bool = False):
    from trl import SFTTrainer  # trl imported here: `finetune --help` and `validate` need no trl

    checked, recipe = resolved_recipe(recipe, "sft")
    aux_coef = recipe.router.aux_loss_coef  # the resolved recipe records the number actually used

    tokenizer = modeling.load_tokenizer(recipe.model)
    # trainer settings first: they set up the launch, and then only the main process prepares the data
    args = train_args.trainer_args(recipe, "sft", staging.staging_for(recipe), aux_coef, wants_eval(recipe.data),
                                   checked.config)
    train, eval_ds, report = build_datasets(recipe.data, tokenizer, "sft", recipe.seed, args.dataset_num_proc)
    faults.point("data")  # test-only: a signal after data preparation, before anything is written
    rundir = staging.reserve(recipe, overwrite, resume)

    # under FSDP2 with cpu_ram_efficient_loading only rank 0 reads the weights (finetune/distributed.py)
    model = distributed.load_base(lambda: load_model(recipe.model), checked.config, recipe.model)
    balancing.apply_aux_loss(model, aux_coef, checked.balancing)  # the same config fields as DPO sets
    with staging.claimed(rundir, recipe):
        # TRL wraps the model in LoRA inside the trainer's constructor, which also creates the
        # checkpoint folder: hence inside `claimed`, which removes the staging again on failure.
        wrap.seed_everything(recipe.seed)
        wrap.announce_router(checked.targets, aux_coef, checked.balancing)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(checked.targets),
            callbacks=[NonFiniteGuard(), *callbacks],
        )
        # SDPA within rows, not over the pack, when TRL's collator packs: its own decision, which also
        # covers BFD packing (it turns padding_free on inside the constructor)
        packed_attention.use_for_padding_free(model, trainer.padding_free)
        counts = wrap.finish_wrap(trainer, checked.targets, recipe.lora.expert_path)
        wrap.attach_routing_metrics(trainer, rundir)
        wrap.attach_watchers(trainer, recipe, rundir, tokenizer)
        base = [{"kind": "base", "model": recipe.model.name_or_path}]
        return save.train_and_save("sft", trainer, tokenizer, rundir, recipe, checked, counts, report, base)
