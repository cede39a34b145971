"""Adapter chains: rebuild base -> SFT -> DPO from run directories, merged or not.

Each stage's adapter was trained on top of the previous stages merged into the base weights
(DPO trains a fresh LoRA on the merged SFT model, so that "adapters disabled" is the SFT model
and TRL's reference log-probs are the SFT model's). Rebuilding therefore merges the adapters
in order. Used by DPO (its starting model), export and eval. A run trained on a 4-bit base loads
as an adapter stack instead (finetune/qlora/stacked.py).

    finetune eval runs/tiny-moe/dpo --data data/tiny-tasks/test.jsonl
Layer: load.
"""

from __future__ import annotations

import logging
import warnings

from peft import PeftModel
from safetensors import SafetensorError

import finetune.lora  # noqa: F401  (installs the PEFT target fix before adapters load: lora/peft_compat.py)
from finetune import balancing, modeling, runs
from finetune.errors import UserError
from finetune.load import load_model
from finetune.load.placement import choose_placement, config_dtype
from finetune.qlora.stacked import load_stacked
from finetune.recipe import ModelSection

log = logging.getLogger("finetune")


def load_chain(run: runs.Run, dtype: str | None = None, keep_last: bool = False, device_map=None,
               quantized: bool | None = None):
    """The base model with the chain's adapters merged in order.

    With keep_last, the last adapter stays an unmerged PeftModel (the reference that export
    compares its merged weights against). With a device_map the base is loaded onto its
    device(s) and PEFT puts each adapter beside the weights it changes, so merging happens there.
    A run trained on a 4-bit base (`quantized`, default: as the run was trained) loads that base
    with the adapters stacked, unmerged (finetune/qlora/stacked.py); quantized=False merges them
    into the 16-bit base instead (export).
    """
    runs.check_adapter_hashes(run)  # before loading the base: a damaged chain fails in a second, by file name
    section = ModelSection(**{**run.recipe.model.__dict__})
    if dtype:
        section.dtype = dtype
    if quantized is None:
        quantized = section.quantized
    if quantized:
        return load_stacked(section, runs.adapter_dirs(run), device_map=device_map)
    section.quantization = "none"
    model = modeling.load_pretrained(section, device_map=device_map)
    dirs = runs.adapter_dirs(run)
    for i, path in enumerate(dirs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about pattern keys it matched on parameters
            try:
                model = PeftModel.from_pretrained(model, str(path))
            except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
                raise UserError(f"{path / runs.ADAPTER_FILE}: cannot load the adapter ({str(exc).splitlines()[0]}); "
                                f"the run chain of {run.path} is damaged: rerun that stage") from None
        if keep_last and i == len(dirs) - 1:
            break
        model = model.merge_and_unload()
    model.eval()
    return model


def load_for_inference(name: str, dtype: str | None = None, device: str | None = None):
    """(model, tokenizer) from a run directory, an exported checkpoint, or a base model/hub id.

    Placed by finetune.load.placement.choose_placement: 16-bit on every GPU when there is one,
    float32 on the CPU otherwise; dtype/device override ("auto" or None keeps the default).
    Router logits are switched off: a checkpoint saved with `output_router_logits: true` would
    compute the aux loss in every generation step, and batched `generate` fails on it.
    """
    if runs.is_run(name):
        run = runs.read_run(name)
        base = run.recipe.model
        where = choose_placement(device, dtype, config_dtype(modeling.load_config(base)))
        log.info("loading %s in %s on %s", name, where.dtype_name, where.device_map or "cpu")
        model = load_chain(run, dtype=where.dtype_name, device_map=where.device_map)
        model.config._name_or_path = str(run.path)  # reports name the run, not its base
        balancing.router_logits_off(model)
        tokenizer = modeling.load_tokenizer(ModelSection(name_or_path=str(run.path)))
        return model, tokenizer
    section = ModelSection(name_or_path=name)
    where = choose_placement(device, dtype, config_dtype(modeling.load_config(section)))
    section.dtype = where.dtype_name
    log.info("loading %s in %s on %s", name, where.dtype_name, where.device_map or "cpu")
    model = load_model(section, device_map=where.device_map)
    model.eval()
    balancing.router_logits_off(model)
    return model, modeling.load_tokenizer(section)
