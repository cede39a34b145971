"""Checks of a streamed export: independent deltas, the written bytes, and logits on a probe batch.

    finetune export RUN --output DIR [--forward-check auto|full|truncated]   (finetune/export/__init__.py)

Three separate questions, so that a correct bfloat16 export is never failed for bfloat16's own
rounding (which a single "merged vs chain" logit tolerance mixed in):
1. merge (float32, tight): each merged tensor against base + the chain's deltas computed by PEFT's
   own code (`get_delta_weight` on the adapter's modules, weights loaded by PEFT's loader), and
   the chain merged by PEFT against the unmerged chain on a probe batch;
2. files (output dtype, exact): every tensor read back with safetensors equals, byte for byte,
   the merged tensor the export rounded, and the checkpoint loaded by plain transformers gives
   the logits of PEFT's merged model rounded to the same dtype;
3. the dtype's rounding (information only): exported logits against the unmerged chain.
When the model does not fit comfortably in memory, the forward checks run on a model truncated
to the first, middle and last decoder layers (fewer when those exceed twice the largest base
shard: truncated_layers), cut from the base, the adapters and the export.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.tuners.lora.layer import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from peft.utils.save_and_load import load_peft_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from finetune import modeling
from finetune.errors import CheckFailed
from finetune.export import deltas, shards

# Relative logit error, max|a - b| / max|b|, allowed in the forward checks. Both compare models
# with the same weights up to float32 summation order (and, for the files check, the rare weight
# whose rounding to the output dtype that order flips), so the bound is tight for every dtype.
MERGE_TOLERANCE = 1e-4
FILES_TOLERANCE = 1e-4


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()


def peft_reference(adapters: list[deltas.Adapter]):
    """term -> its value computed by PEFT: its loader fills the adapter's LoRA modules, its
    get_delta_weight computes the delta (the merge code computes them from the raw files)."""
    modules = {}
    for adapter in adapters:
        model = adapter.peft_model
        for module in model.modules():  # only the small adapter tensors leave the meta device
            if isinstance(module, LoraLayer):
                module.lora_A.to_empty(device="cpu")
                module.lora_B.to_empty(device="cpu")
            if isinstance(module, ModulesToSaveWrapper):
                module.modules_to_save.to_empty(device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_peft_model_state_dict(model, load_peft_weights(str(adapter.path), device="cpu"), adapter_name="default")
        named = dict(model.named_modules())
        for terms in adapter.terms.values():
            for term in terms:
                modules[id(term)] = named[term.module]

    def value(term: deltas.Term) -> torch.Tensor:
        module = modules[id(term)]
        if term.kind == "replace":
            copy = module.modules_to_save["default"]  # its buffers too (a router's e_score_correction_bias)
            # the name below the copied module, which may be nested (Gemma-4's router: `proj.weight`)
            local = term.param.removeprefix(deltas.owner_of(term.module) + ".")
            return dict([*copy.named_parameters(), *copy.named_buffers()])[local].detach().float()
        if hasattr(module, "parameter_name"):
            # ParamWrapper casts its delta to the adapted parameter's device and dtype; that parameter
            # stays on the meta device here, so hand it a float32 CPU stand-in for the call.
            module.get_param = lambda: torch.empty(0)
            try:
                return module.get_delta_weight("default").detach().float()
            finally:
                del module.get_param
        return module.get_delta_weight("default").detach().float()

    return value


def check_files(out_dir: Path, digests: dict[str, str]) -> None:
    """Every tensor read back with safetensors is byte-identical to what the merge rounded."""
    written = shards.read_digests(out_dir)
    missing, extra = sorted(set(digests) - set(written)), sorted(set(written) - set(digests))
    if missing or extra:
        raise CheckFailed(f"export check failed: written checkpoint lacks {missing[:3]} / has unexpected {extra[:3]}")
    bad = [k for k, d in digests.items() if written[k][0] != d]
    if bad:
        raise CheckFailed(f"export check failed: {len(bad)} written tensors differ from the merged tensors, e.g. {bad[0]}")


def _layer_map(layers: list[int]):
    new = {old: i for i, old in enumerate(layers)}

    def rename(key: str) -> str | None:
        layer = shards.layer_of(key)
        if layer is None:
            return key
        if layer not in new:
            return None
        return shards.LAYER.sub(f".layers.{new[layer]}.", key, count=1)

    return rename


def truncate_checkpoint(src: Path, layers: list[int], dst: Path) -> Path:
    """A copy of the checkpoint with only the given decoder layers (renumbered 0..k-1), copied
    tensor by tensor (finetune/export/shards.py's writer), so the copy never sits in memory."""
    rename = _layer_map(layers)
    dst.mkdir(parents=True)
    specs = shards.tensor_specs(shards.shard_files(src))
    kept = [(key, rename(key)) for key in specs if rename(key) is not None]
    writer = shards.ShardWriter(dst / "model.safetensors", [(new, specs[key][1], specs[key][2]) for key, new in kept])
    try:
        handles = {}
        try:
            for key, new in kept:
                file = specs[key][0]
                if file not in handles:
                    for h in handles.values():
                        h.__exit__(None, None, None)
                    handles = {file: safe_open(str(file), "pt").__enter__()}
                writer.write(new, handles[file].get_tensor(key))
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)
    finally:
        writer.close()
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = len(layers)
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = [text["layer_types"][i] for i in layers]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def truncate_adapter(src: Path, layers: list[int], dst: Path, base: Path) -> Path:
    rename = _layer_map(layers)
    dst.mkdir(parents=True)
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        kept = {rename(k): f.get_tensor(k) for k in f.keys() if rename(k) is not None}
    save_file(kept, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dst


def truncated_layers(base_dir: Path, n: int) -> list[int]:
    """The decoder layers the truncated check keeps: first, middle and last, or fewer (the middle,
    then the first dropped) when their float32 weights would exceed twice the base's largest shard,
    the bound the merge keeps, so that the check does not set the export's peak (one Mixtral-8x7B
    layer is 5.6 GB in float32, three would be 17 GB against 10 GB for two of its shards)."""
    files = shards.shard_files(base_dir)
    per_layer: dict[int, int] = {}
    for key, (_, shape, _) in shards.tensor_specs(files).items():
        layer = shards.layer_of(key)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + 4 * int(torch.Size(shape).numel())
    budget = 2 * max(f.stat().st_size for f in files)
    chosen = sorted({0, n // 2, n - 1})
    while len(chosen) > 1 and sum(per_layer.get(i, 0) for i in chosen) > budget:
        chosen.pop(len(chosen) // 2 if len(chosen) == 3 else 0)
    return chosen


def choose_mode(mode: str, base_dir: Path) -> str:
    """full when the float32 model fits twice over in half the available memory, else truncated."""
    if mode != "auto":
        return mode
    specs = shards.tensor_specs(shards.shard_files(base_dir))
    float32_bytes = 4 * sum(int(torch.Size(shape).numel()) for _, shape, _ in specs.values())
    return "full" if 2 * float32_bytes <= 0.5 * shards.free_bytes_estimate() else "truncated"


@torch.no_grad()
def forward_check(base_dir: Path, adapter_dirs: list[Path], written_dir: Path, dtype: torch.dtype,
                  probe: torch.Tensor, mode: str, scratch: Path) -> dict:
    """Logit checks 1 and 3 of the module docstring, on the whole model or a truncated one."""
    mode = choose_mode(mode, base_dir)
    layers = None
    if mode == "truncated":
        n = json.loads((written_dir / "config.json").read_text())
        n = n.get("text_config", n)["num_hidden_layers"]
        layers = truncated_layers(base_dir, n)
        base_dir = truncate_checkpoint(base_dir, layers, scratch / "base")
        adapter_dirs = [truncate_adapter(Path(d), layers, scratch / f"adapter-{i}", base_dir) for i, d in enumerate(adapter_dirs)]
        written_dir = truncate_checkpoint(written_dir, layers, scratch / "export")
    try:
        model = AutoModelForCausalLM.from_pretrained(  # an MXFP4 base (gpt-oss) decoded, as training loaded it
            base_dir, dtype=torch.float32, **modeling.dequantized(AutoConfig.from_pretrained(base_dir), str(base_dir))).eval()
        for i, path in enumerate(adapter_dirs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(model, str(path))
            if i < len(adapter_dirs) - 1:
                model = model.merge_and_unload()
        chain_logits = model(input_ids=probe).logits.float()
        merged = model.merge_and_unload() if adapter_dirs else model
        merged_logits = merged(input_ids=probe).logits.float()
        for p in merged.parameters():
            p.data = p.data.to(dtype).float()
        rounded_logits = merged(input_ids=probe).logits.float()
        del model, merged
        exported = AutoModelForCausalLM.from_pretrained(written_dir, dtype=torch.float32).eval()
        export_logits = exported(input_ids=probe).logits.float()
        del exported
    finally:
        if layers is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "mode": mode if layers is None else f"truncated to decoder layers {layers}",
        "merge_relative_error": relative_error(merged_logits, chain_logits),
        "files_relative_error": relative_error(export_logits, rounded_logits),
        "rounding_relative_error": relative_error(export_logits, chain_logits),
        "merge_tolerance": MERGE_TOLERANCE,
        "files_tolerance": FILES_TOLERANCE,
    }
    if not result["merge_relative_error"] <= MERGE_TOLERANCE:
        raise CheckFailed(f"export check failed: the chain merged in float32 differs from the adapter chain by "
                          f"{result['merge_relative_error']:.2e} (relative logits), above {MERGE_TOLERANCE:.0e}")
    if not result["files_relative_error"] <= FILES_TOLERANCE:
        raise CheckFailed(f"export check failed: the written checkpoint's logits differ from the adapter chain merged "
                          f"and rounded to {str(dtype).removeprefix('torch.')} by {result['files_relative_error']:.2e} "
                          f"(relative), above {FILES_TOLERANCE:.0e}")
    return result
