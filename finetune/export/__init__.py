"""Export: merge a run's adapter chain into a standalone, verified instruct checkpoint, streaming.

    finetune export runs/tiny-moe/dpo --output exports/tiny-moe-instruct [--dtype bfloat16]
        [--max-shard-size 5GB] [--forward-check auto|full|truncated]

The base checkpoint is merged shard by shard (finetune/export/merge.py), so the export needs memory for
about one base shard plus the largest adapted parameter, not the model. The output is what
transformers itself writes (sharded safetensors with the index; for Mixtral the per-expert
`block_sparse_moe.experts.N.w1/w2/w3` keys), config, the tokenizer with its chat template in a
class transformers 4.x and 5.x both load, a generation_config whose EOS is the template's
end-of-turn token, export.json and a model card. Before the output appears it is verified
(finetune/export/verify.py): every merged tensor against PEFT's own deltas, the written bytes against
the merged tensors, and logits on a probe batch (whole model, or first/middle/last decoder layers
when it does not fit in memory). Everything is written to a temporary sibling directory and
renamed into place, so a failed or interrupted export leaves nothing under --output and running
it again replaces the previous export. Files get the permissions an ordinary save gives (umask).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from finetune import modeling, runs
from finetune.errors import UserError
from finetune.export import merge, shards, verify
from finetune.export.model_card import write_model_card
from finetune.export.nf4_check import check_against_4bit, probe_logits
from finetune.export.tokenizer_files import save_tokenizer
from finetune.recipe import ModelSection
from finetune.runs import diskspace, faults, lock, signals
from finetune.runs.outputs import check_destination, swap_into_place

log = logging.getLogger("finetune")

MANIFEST = "export.json"
FORWARD_CHECKS = ("auto", "full", "truncated")


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
    """A fixed, deterministic conversation, tokenized: the inputs the forward checks compare on."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Check the merge: reverse lamp, then add 3 and 4."},
         {"role": "assistant", "content": "pmal 7"}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :length]
    return ids


def _check_destination(output: str | Path, overwrite: bool, run: runs.Run) -> Path:
    """The resolved --output, or a UserError: never the run, its chain, the base model, nor inside them
    (finetune/runs/outputs.py); --overwrite replaces only a previous export."""

    protected = {"the run being exported": run.path}
    protected.update({f"the run {link['run']} of its chain": link["run"] for link in run.chain[1:]})
    if Path(run.chain[0]["model"]).exists():
        protected["the base model"] = run.chain[0]["model"]
    return check_destination(output, "export", overwrite, protected, what="--output")


def _make_tmp(output: Path) -> Path:
    """An empty sibling directory, created with the umask's permissions (tempfile.mkdtemp's 0700
    would make the export unreadable to other users and serving processes)."""
    while True:
        tmp = output.with_name(f".{output.name}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue


def _save_config(config, dtype: torch.dtype, directory: Path) -> None:
    """config.json in the output dtype, readable by transformers 4.x too: 5.x writes the RoPE settings
    only as `rope_parameters`, which 4.x does not read; it then takes the architecture's default
    (rope_theta 1e6 for Mixtral) and computes another model without a word (logits 7.6 off on the
    bundled default). The legacy keys carry the same values."""
    config.dtype = dtype
    config.save_pretrained(directory)
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        raw.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            raw.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _generation_config(tokenizer, directory: Path) -> str:
    eot = end_of_turn_token(tokenizer)
    eos_ids = [tokenizer.convert_tokens_to_ids(eot)]
    if tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    gen.save_pretrained(directory)
    return eot


def export(run_dir: str, output: str, dtype: str = "bfloat16", max_shard_size: str = "5GB", overwrite: bool = False,
           forward_check: str = "auto", progress: bool = True) -> Path:
    started = time.perf_counter()
    run = runs.read_run(run_dir)
    if forward_check not in FORWARD_CHECKS:
        raise UserError(f"--forward-check {forward_check!r}: choose one of {', '.join(FORWARD_CHECKS)}")
    shards.parse_size(max_shard_size)
    output = _check_destination(output, overwrite, run)
    runs.check_adapter_hashes(run)  # a damaged chain fails now, by file name, before any shard is read
    base_dir = shards.checkpoint_dir(run.recipe.model.name_or_path)
    adapter_dirs = runs.adapter_dirs(run)
    tokenizer = modeling.load_tokenizer(ModelSection(name_or_path=str(run.path)))
    torch_dtype = modeling.DTYPES[dtype]
    needed = shards.planned_bytes(base_dir, torch_dtype)
    diskspace.require(output.parent, needed, "the export", "free space there or choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)  # only now: every check on the inputs has passed
    held = lock.acquire(output, "--output", overwrite, "--overwrite")
    try:
        return _export(run, output, base_dir, adapter_dirs, tokenizer, dtype, torch_dtype, max_shard_size,
                       forward_check, progress, started)
    except Exception as exc:  # the temporary directory is gone already (_export's finally)
        if diskspace.is_full(exc):  # another process filled the disk after the check
            raise diskspace.full_error(output.parent, "the export", needed, diskspace.free_bytes(output.parent)[1],
                                       "free space there or choose another --output") from None
        raise
    finally:
        lock.release(held)


def _export(run, output, base_dir, adapter_dirs, tokenizer, dtype, torch_dtype, max_shard_size, forward_check,
            progress, started) -> Path:
    tmp = _make_tmp(output)
    try:
        config = merge.load_config(base_dir)
        adapters = merge.read_chain(config, adapter_dirs)
        log.info("merging %d adapter(s) into %s, one shard at a time", len(adapters), base_dir)
        merged = merge.merge_checkpoint(base_dir, adapters, tmp, torch_dtype, max_shard_size,
                                        reference=verify.peft_reference(adapters), progress=progress)
        del adapters
        faults.point("export")  # test-only: a signal with the shards half verified
        verify.check_files(tmp, merged["digests"])
        if merged["mxfp4"]:  # the experts are written decoded: the export is a plain 16-bit checkpoint
            log.info(merged["mxfp4"])
            del config.quantization_config
        _save_config(config, torch_dtype, tmp)
        tokenizer_info = save_tokenizer(tokenizer, tmp)
        eot = _generation_config(tokenizer, tmp)

        forward = verify.forward_check(base_dir, adapter_dirs, tmp, torch_dtype, probe_batch(tokenizer),
                                       forward_check, tmp / ".verify")
        manifest = {
            "run": str(run.path), "chain": run.chain, "dtype": dtype, "base_checkpoint": str(base_dir),
            "shards": merged["shards"], "max_shard_size": max_shard_size,
            "checks": {"tensors": {**merged["tensor_check"], "checked": merged["adapted_tensors"]},
                       "files": {"tensors": merged["tensors"], "byte_identical": True},
                       "forward": forward},
            "tokenizer": tokenizer_info, "end_of_turn_token": eot, "base_mxfp4": merged["mxfp4"],
            "seconds": time.perf_counter() - started,
        }
        if run.chain[0].get("from_model"):  # DPO from a model: the merge's base, with an export's own record
            manifest["from_model"] = {k: v for k, v in run.chain[0].items() if k not in ("kind", "from_model")}
        if run.recipe.model.quantized:
            # a 4-bit (QLoRA) run merged into the original 16-bit base: compared with its 4-bit self too
            probe = probe_batch(tokenizer)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).eval()
            manifest.update(check_against_4bit(run, probe, probe_logits(reloaded, probe)))
            del reloaded
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        write_model_card(tmp, output.name, run, manifest)
        with signals.deferred(finished=str(output)):  # the old export stays until the new one is in place
            swap_into_place(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    checks = manifest["checks"]
    print(f"exported {run.path} -> {output} ({dtype}, {len(merged['shards'])} shard(s)); checks passed: tensors vs PEFT "
          f"{checks['tensors']['max_relative_error']:.1e}, float32 merge vs chain {forward['merge_relative_error']:.1e}, "
          f"files byte-identical, logits vs merged-and-rounded {forward['files_relative_error']:.1e} ({forward['mode']}); "
          f"{dtype} rounding moves the logits by {forward['rounding_relative_error']:.1e} (relative, information)")
    if manifest["base_mxfp4"]:
        print(f"  {manifest['base_mxfp4']}")
    if "nf4_tolerance" in manifest:
        print(f"  against the 4-bit chain it was trained as: {manifest['nf4_chain_relative_error']:.2e} <= "
              f"{manifest['nf4_tolerance']:.2e} (2 x the base's own 4-bit vs 16-bit gap {manifest['nf4_base_gap']:.2e} + 1e-3)")
    return output
