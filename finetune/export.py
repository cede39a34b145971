"""Export: merge a run's adapter chain into a standalone, verified instruct checkpoint.

    finetune export runs/tiny-moe/dpo --output exports/tiny-moe-instruct [--dtype bfloat16]

The checkpoint is what transformers itself writes (sharded safetensors; for Mixtral the
per-expert `block_sparse_moe.experts.N.w1/w2/w3` keys, so other tools load it), plus the
tokenizer with its chat template, a generation_config whose EOS is the template's end-of-turn
token, and a model card. Before the output appears, the written files are loaded back with plain
transformers and their logits compared on a probe batch with the unmerged adapter chain (merged
in float32); a mismatch beyond the dtype's tolerance fails the export. Everything is written to a
temporary sibling directory and renamed into place, so an interrupted export never leaves a
half checkpoint under --output, and running it again simply replaces the previous export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from finetune import chain, modeling, runs
from finetune.errors import CheckFailed, UserError
from finetune.model_card import write_model_card
from finetune.recipe import ModelSection

log = logging.getLogger("finetune")

# Largest relative logit error, max|merged - chain| / max|chain|, accepted for each output dtype:
# float32 only reorders sums; 16-bit formats round every weight once (bfloat16 keeps 8 bits).
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 4e-2}
MANIFEST = "export.json"


def end_of_turn_token(tokenizer) -> str:
    """The special token the chat template puts after an assistant turn (</s> for Mixtral)."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = text[text.rindex("pong") + len("pong"):]
    for token in tokenizer.all_special_tokens:
        if token and tail.lstrip().startswith(token):
            return token
    return tokenizer.eos_token


def probe_batch(tokenizer, length: int = 32) -> torch.Tensor:
    """A fixed, deterministic conversation, tokenized: the inputs the merge check compares on."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Check the merge: reverse lamp, then add 3 and 4."},
         {"role": "assistant", "content": "pmal 7"}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :length]
    return ids


def _check_destination(output: str | Path, overwrite: bool, run: runs.Run) -> Path:
    """The resolved --output, or a UserError: never the run, its chain, the base model, nor inside them
    (finetune/outputs.py); --overwrite replaces only a previous export."""
    from finetune.outputs import check_destination

    protected = {"the run being exported": run.path}
    protected.update({f"the run {link['run']} of its chain": link["run"] for link in run.chain[1:]})
    if Path(run.chain[0]["model"]).exists():
        protected["the base model"] = run.chain[0]["model"]
    return check_destination(output, "export", overwrite, protected, what="--output")


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename tmp to output; an existing export is moved aside first and removed after."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(run_dir: str, output: str, dtype: str = "bfloat16", max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    run = runs.read_run(run_dir)
    output = _check_destination(output, overwrite, run)
    tokenizer = modeling.load_tokenizer(ModelSection(name_or_path=str(run.path)))
    probe = probe_batch(tokenizer)

    log.info("rebuilding the adapter chain of %s in float32", run.path)
    # a 4-bit (QLoRA) run merges into the original 16-bit base too, then is compared with its 4-bit self below
    unmerged = chain.load_chain(run, dtype="float32", keep_last=True, quantized=False)
    reference = chain.probe_logits(unmerged, probe)
    merged = unmerged.merge_and_unload() if hasattr(unmerged, "merge_and_unload") else unmerged
    merged = merged.to(modeling.DTYPES[dtype])

    output.parent.mkdir(parents=True, exist_ok=True)  # only now: every check on the inputs has passed
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        eot = end_of_turn_token(tokenizer)
        eos_ids = [tokenizer.convert_tokens_to_ids(eot)]
        if tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(tokenizer.eos_token_id)
        gen = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
            pad_token_id=tokenizer.pad_token_id, do_sample=False,
        )
        gen.save_pretrained(tmp)

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=modeling.DTYPES[dtype])
        got = chain.probe_logits(reloaded.eval(), probe)
        error = ((got - reference).abs().max() / reference.abs().max().clamp(min=1e-6)).item()
        if not error <= TOLERANCE[dtype]:
            raise CheckFailed(
                f"export check failed: the merged {dtype} checkpoint's logits differ from the adapter chain by "
                f"{error:.2e} (relative), above the {TOLERANCE[dtype]:.0e} allowed for {dtype}; nothing was written to {output}"
            )
        manifest = {"run": str(run.path), "chain": run.chain, "dtype": dtype, "probe_relative_error": error,
                    "tolerance": TOLERANCE[dtype], "end_of_turn_token": eot}
        if run.recipe.model.quantization == "nf4":
            from finetune.qlora_chain import check_against_4bit

            manifest.update(check_against_4bit(run, probe, got))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        write_model_card(tmp, run, manifest)
        _swap_into_place(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {run.path} -> {output} ({dtype}; merge check: relative logit error {error:.2e} <= {TOLERANCE[dtype]:.0e})")
    if "nf4_tolerance" in manifest:
        print(f"  against the 4-bit chain it was trained as: {manifest['nf4_chain_relative_error']:.2e} <= "
              f"{manifest['nf4_tolerance']:.2e} (2 x the base's own 4-bit vs 16-bit gap {manifest['nf4_base_gap']:.2e} + 1e-3)")
    return output
