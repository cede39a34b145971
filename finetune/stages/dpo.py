"""Preference tuning (DPO) on top of an SFT run, with the SFT model as the reference (or on any model: from_model).

    finetune dpo recipes/tiny-moe/dpo.yaml
    accelerate launch -m finetune dpo recipes/mixtral-8x7b/dpo.yaml

Design: the SFT adapter chain is merged into the base weights in memory, and a fresh LoRA is
trained on top with TRL's DPOTrainer. TRL computes reference log-probs with the adapters
disabled, which is then exactly the SFT model. (Handing TRL the SFT PeftModel instead makes it
copy the adapter into a "ref" adapter; the merged design is simpler to verify and keeps one
adapter per stage, which export merges in order.) tests/unit/stages/test_dpo.py proves it: at the first
step every implicit reward is 0, and the reference log-probs equal base + SFT adapter.
On a 4-bit base (`model.quantization: nf4` in the SFT run) the SFT adapter cannot be merged, so
it stays loaded as TRL's frozen "ref" adapter instead (finetune/qlora/stacked.py).
With `from_model:` instead of `from_run:` (a hub id, a checkpoint folder, an export of this tool)
the model is loaded as it is (16-bit, or 4-bit with model.quantization: nf4) and the fresh LoRA
trains on it; "adapters disabled" is then that model, the reference (finetune/runs/from_model.py
records it in the chain; tests/unit/stages/test_dpo_from_model.py proves the first-step rewards are 0).
Layer: stages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune import balancing, distributed, modeling, runs
from finetune.data.prep import build_datasets, wants_eval
from finetune.guards import NonFiniteGuard
from finetune.load import load_model
from finetune.load.chain import load_chain
from finetune.lora.targets import lora_config
from finetune.qlora import stacked
from finetune.recipe import ModelSection, Recipe
from finetune.runs import faults, from_model, staging
from finetune.train import args as train_args
from finetune.train import save, wrap
from finetune.validate.resolve import resolved_recipe

log = logging.getLogger("finetune")


def prepare_inputs(recipe: Recipe, aux_coef: float, parent: runs.Run | None):
    """Tokenizer, data sets and trainer settings: every check on the inputs, before any disk change.
    parent: the SFT run (from_run), or None: the tokenizer of from_model (recipe.model)."""
    section = recipe.model if parent is None else ModelSection(**{**recipe.model.__dict__, "name_or_path": str(parent.path)})
    tokenizer = modeling.load_tokenizer(section)
    # trainer settings first: they set up the launch, and then only the main process prepares the data
    args = train_args.trainer_args(recipe, "dpo", staging.staging_for(recipe), aux_coef, wants_eval(recipe.data))
    train, eval_ds, report = build_datasets(recipe.data, tokenizer, "preference", recipe.seed, args.dataset_num_proc)
    return tokenizer, train, eval_ds, report, args


def load_start(parent: runs.Run | None, checked, section: ModelSection | None = None):
    """The model DPO starts from: the merged SFT chain, or for a 4-bit run the bare 4-bit base
    (the SFT adapter is stacked on it after TRL has wrapped the model); without a parent run,
    from_model as it is (`section`, the resolved recipe's model section, names it)."""
    if parent is None:
        section = section or checked.recipe.model
        return distributed.load_base(lambda: load_model(section), checked.config, section)
    if parent.recipe.model.quantized:
        return stacked.load_base_for_dpo(parent)
    # under FSDP2 only rank 0 merges the SFT chain; the others receive the merged weights
    return distributed.load_base(lambda: load_chain(parent), checked.config, parent.recipe.model)


def build_trainer(recipe: Recipe, checked, aux_coef: float, parent: runs.Run | None, extra_callbacks=(), inputs=None,
                  model=None):
    """The DPOTrainer on the merged parent chain (or from_model: parent None), and what went into it
    (tests use this directly)."""
    from trl import DPOTrainer  # trl imported here: `finetune --help` and `validate` need no trl

    tokenizer, train, eval_ds, report, args = inputs or prepare_inputs(recipe, aux_coef, parent)
    if model is None:
        model = load_start(parent, checked, recipe.model)
    balancing.apply_aux_loss(model, aux_coef, checked.balancing)  # TRL's DPOTrainer leaves the config as loaded
    # a 4-bit SFT run's adapter becomes the frozen "ref" adapter; a 4-bit from_model is its own reference
    stacked_ref = recipe.model.quantized and parent is not None
    trainer_class = stacked.stacked_reference_trainer_class() if stacked_ref else DPOTrainer
    wrap.seed_everything(recipe.seed)
    wrap.announce_router(checked.targets, aux_coef, checked.balancing)
    trainer = trainer_class(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(checked.targets),
        callbacks=[NonFiniteGuard(), *extra_callbacks],
    )
    if stacked_ref:  # the SFT adapter as TRL's frozen "ref" adapter, stacked under the new one
        stacked.add_reference_adapter(trainer.model, runs.adapter_dirs(parent)[0])
    counts = wrap.finish_wrap(trainer, checked.targets, recipe.lora.expert_path)
    wrap.attach_routing_metrics(trainer, staging.RunDir(Path(recipe.output_dir), staging.staging_for(recipe)))
    return trainer, tokenizer, report, counts


def run_dpo(recipe: Recipe, overwrite: bool = False, callbacks=(), resume: bool = False):
    checked, recipe = resolved_recipe(recipe, "dpo")
    parent = runs.read_run(recipe.from_run) if recipe.from_run else None  # None: from_model
    if parent is not None:
        recipe.from_run = str(parent.path)
    aux_coef = recipe.router.aux_loss_coef
    inputs = prepare_inputs(recipe, aux_coef, parent)  # trainer_args inside refuses a bad launch too
    faults.point("data")  # test-only: a signal after data preparation, before anything is written
    rundir = staging.reserve(recipe, overwrite, resume)
    model = load_start(parent, checked, recipe.model)  # checks every adapter of the chain against its sha256 first
    # after the load: a hub id's snapshot is in the cache, and base_link records its commit
    start_chain = parent.chain if parent is not None else [from_model.base_link(recipe.from_model)]

    with staging.claimed(rundir, recipe):
        trainer, tokenizer, report, counts = build_trainer(recipe, checked, aux_coef, parent, callbacks, inputs, model)
        wrap.attach_watchers(trainer, recipe, rundir, tokenizer)
        if parent is None:
            reference = f"from_model {recipe.from_model} as loaded (adapters disabled)"
        elif recipe.model.quantized:
            reference = f"SFT adapter of {parent.path} as frozen adapter `ref` on the 4-bit base"
        else:
            reference = f"SFT chain of {parent.path} merged (adapters disabled)"
        return save.train_and_save("dpo", trainer, tokenizer, rundir, recipe, checked, counts, report, start_chain,
                                     reference=reference)
