"""Streaming merge: base checkpoint shards + a chain of LoRA adapters -> merged safetensors shards.

    finetune export RUN --output DIR [--dtype bfloat16] [--max-shard-size 5GB]   (finetune/export/__init__.py)

The base checkpoint is read one shard at a time, tensor by tensor. Each tensor the chain adapts
gets the chain's terms (finetune/export/deltas.py) in float32 and is rounded once to the output dtype;
the others are only cast. Deltas are computed in the model's layout (Mixtral's fused
`mlp.experts.gate_up_proj`) and mapped to the on-disk layout (`block_sparse_moe.experts.N.w1`
and `w3`) with transformers' own reverse weight conversion, the one `save_pretrained` uses, so
the written keys are the ones transformers itself saves and other MoE families need no table.
A fused expert parameter's delta is computed one expert's piece at a time, as each on-disk tensor
is written (where each piece sits is found by running the same reverse conversion on a small index
tensor); the independent check holds PEFT's whole-parameter delta (summed over the chain's terms)
from the parameter's first on-disk tensor to its last. Peak memory is about one base shard
(memory-mapped) plus the largest adapted parameter's delta (twice while the check's sum is built),
whatever the model's size. With `reference`, every adapted tensor is also computed through an
independent route (finetune/export/verify.py: PEFT's own delta code) and compared before it is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion

from finetune import modeling
from finetune.errors import CheckFailed, UserError
from finetune.export import deltas, mxfp4, shards

log = logging.getLogger("finetune")

# Largest relative difference, max|merge - independent| / max|independent| per tensor, between the
# merge's float32 tensors and the independent route's: both are float32 sums of the same terms,
# computed with different GEMM orders, so only float32 rounding (about 1e-7) separates them.
TENSOR_TOLERANCE = 1e-5


def load_config(base_dir: Path):
    try:
        return AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"{base_dir}: cannot read the base model's config.json ({exc})") from None


def disk_layout_model(config):
    """The model on the meta device, with the conversions transformers reverses on save attached.

    revert_weight_conversion would otherwise rebuild them from the module tree on every call (70 ms
    for a 184-layer model: minutes over an export); the list is what it builds for a model made
    from a config (no legacy renamings, no prefix changes).
    """
    meta = modeling.meta_model(config)
    conversions = get_model_conversion_mapping(meta, add_legacy=False)
    meta._weight_conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    return meta


def to_disk_layout(meta_model, param: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One parameter's tensor in the model's layout -> the on-disk tensors transformers saves for it."""
    return revert_weight_conversion(meta_model, {param: value})


def _probe_size(d: int, most: int = 8) -> int:
    return max(k for k in range(1, most + 1) if d % k == 0)


def expert_boxes(meta_model, param: str, shape: tuple) -> dict[str, deltas.ExpertBox] | None:
    """Where each on-disk tensor of a fused (E, d1, d2) parameter sits in it, one expert each.

    Found by running transformers' reverse conversion on a small index tensor (E, k1, k2), each
    ki dividing di, whose values say where every element came from; accepted only when every
    output is one expert's rectangle (or its transpose) and, scaled up, has the shape the reverse
    conversion gives the real parameter. None otherwise: the merge then uses the whole delta.
    """
    if len(shape) != 3:
        return None
    experts, d1, d2 = shape
    k1, k2 = _probe_size(d1), _probe_size(d2)
    grid = torch.arange(experts * k1 * k2, dtype=torch.float64).reshape(experts, k1, k2)
    try:
        small = to_disk_layout(meta_model, param, grid)
        full = to_disk_layout(meta_model, param, torch.empty(shape, device="meta"))
    except Exception:  # a conversion that needs the real sizes: no boxes, whole deltas
        return None
    if set(small) != set(full):
        return None
    boxes = {}
    for key, piece in small.items():
        piece = piece.squeeze(0) if piece.ndim == 3 and piece.shape[0] == 1 else piece
        if piece.ndim != 2:
            return None
        flat = piece.long()
        e = int(flat.min()) // (k1 * k2)
        local = flat - e * k1 * k2
        rows, cols = local // k2, local % k2
        (r0, r1), (c0, c1) = (int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1)
        box_grid = grid[e, r0:r1, c0:c1]
        transposed = not torch.equal(piece, box_grid)
        if transposed and not torch.equal(piece, box_grid.t()):
            return None
        s1, s2 = d1 // k1, d2 // k2
        box = deltas.ExpertBox(e, (r0 * s1, r1 * s1), (c0 * s2, c1 * s2), transposed)
        real = ((r1 - r0) * s1, (c1 - c0) * s2)
        if tuple(full[key].shape[-2:]) != (real[::-1] if transposed else real) or full[key].numel() != real[0] * real[1]:
            return None
        boxes[key] = box
    return boxes


def read_chain(config, adapter_dirs: list[Path]) -> list[deltas.Adapter]:
    return [deltas.read_adapter(lambda: modeling.meta_model(config), Path(d)) for d in adapter_dirs]


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after
    which the merge's per-parameter deltas come from the heap and their freed space stays in the
    process: peak RSS then grows by several deltas. A fixed 1 MB threshold keeps every tensor of
    that size in its own mapping, unmapped when freed. Not glibc (or not Linux): nothing to do.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _natural(key: str) -> tuple:
    """`layers.2` before `layers.10` (transformers' dot_natural_key does this with a regex, 100x slower)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def merge_checkpoint(base_dir: Path, adapters: list[deltas.Adapter], out_dir: Path, dtype: torch.dtype,
                     max_shard_size: str | int = "5GB", reference=None, progress: bool = True) -> dict:
    """Write the merged checkpoint's weights (shards + index) into out_dir; return what was written.

    adapters: read_chain(config, adapter_dirs), oldest first.

    reference(term) -> float32 tensor: the independent route for one term's value, or None to skip
    the tensor check.
    """
    started = time.perf_counter()
    _return_freed_memory()
    max_bytes = shards.parse_size(max_shard_size)
    config = load_config(base_dir)
    meta = disk_layout_model(config)
    terms = deltas.chain_terms(adapters)
    files = shards.shard_files(base_dir)
    specs = shards.tensor_specs(files)
    mx = mxfp4.decode_specs(specs)  # gpt-oss: MXFP4 experts are read decoded and written in `dtype`

    owner: dict[str, str] = {}
    pieces: dict[str, int] = {}
    for param, param_terms in terms.items():
        keys = list(to_disk_layout(meta, param, torch.empty(param_terms[0].shape, device="meta")))
        missing = [k for k in keys if k not in specs]
        if missing:
            raise UserError(
                f"{base_dir}: the adapters change `{param}`, stored as `{missing[0]}` in the layout transformers saves, "
                f"but the base checkpoint has no such tensor; re-save the base with transformers' save_pretrained"
            )
        owner.update((k, param) for k in keys)
        pieces[param] = len(keys)

    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if d.is_floating_point else d

    # Base order, with the pieces of one parameter next to each other so its delta lives briefly.
    order = []
    for file in files:
        keys = [k for k, spec in specs.items() if spec[0] == file]
        keys.sort(key=lambda k: (_natural(owner.get(k, k)), _natural(k)))
        order += keys
    layout = shards.group_into_shards([(k, specs[k][1], out_dtype(specs[k][2])) for k in order], max_bytes)
    names = shards.shard_names(len(layout))

    cache: dict[str, dict] = {}

    def pieces_of(param: str) -> dict:
        entry = cache.get(param)
        if entry is None:
            param_terms = terms[param]
            boxes = expert_boxes(meta, param, param_terms[0].shape) if all(t.kind == "add" for t in param_terms) else None
            if boxes is not None:  # one expert's piece at a time, computed when its tensor is written
                mine = {key: [("add", lambda t=t, box=box: t.expert_value(box)) for t in param_terms]
                        for key, box in boxes.items()}
            else:
                mine = [(t.kind, to_disk_layout(meta, param, t.value())) for t in param_terms]
            entry = {"left": pieces[param], "mine": mine, "ref": independent(param, param_terms, summed=boxes is not None)}
            cache[param] = entry
        return entry

    def independent(param: str, param_terms: list, summed: bool):
        """The check's route: PEFT's whole-parameter delta per term (its API has no per-expert
        delta). `summed` (add terms only): one running sum, so a chain holds one delta, not one per
        stage; the order of a sum the check compares against does not change what it catches."""
        if reference is None:
            return None
        if not summed:
            return [(t.kind, to_disk_layout(meta, param, reference(t))) for t in param_terms]
        total = None
        for t in param_terms:
            value = reference(t)
            total = value.clone() if total is None else total.add_(value)
            del value
        return [("add", to_disk_layout(meta, param, total))]

    def terms_for(entry: dict, key: str) -> list:
        if isinstance(entry["mine"], dict):
            return [(kind, compute()) for kind, compute in entry["mine"].pop(key)]
        return [(kind, d.pop(key)) for kind, d in entry["mine"]]

    digests: dict[str, str] = {}
    worst = {"error": 0.0, "tensor": None}
    current_file, handle = None, None
    bar = tqdm(total=len(files), desc="merging base shards", unit="shard", disable=not progress)
    try:
        for name, entries in zip(names, layout):
            writer = shards.ShardWriter(out_dir / name, entries)
            for key, _, want in entries:
                file = specs[key][0]
                if file != current_file:
                    if handle is not None:
                        handle.__exit__(None, None, None)
                        bar.update(1)
                    handle = safe_open(str(file), "pt").__enter__()
                    current_file = file
                base = mxfp4.read(key, mx) if key in mx else handle.get_tensor(key)
                if key in owner:
                    param = owner[key]
                    entry = pieces_of(param)
                    merged = deltas.apply_terms(base.float(), terms_for(entry, key))
                    if entry["ref"] is not None:
                        expected = deltas.apply_terms(base.float(), [(kind, d.pop(key)) for kind, d in entry["ref"]])
                        error = ((merged - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
                        if error > worst["error"] or worst["tensor"] is None:
                            worst.update(error=error, tensor=key)
                        if not error <= TENSOR_TOLERANCE:
                            raise CheckFailed(
                                f"export check failed: merged tensor {key} differs from base + the chain's deltas computed "
                                f"by PEFT by {error:.2e} (relative), above {TENSOR_TOLERANCE:.0e}"
                            )
                    entry["left"] -= 1
                    if entry["left"] == 0:
                        del cache[param]
                    out = merged.to(want)
                else:
                    out = base.to(want)
                digests[key] = writer.write(key, out)
                del base, out
            writer.close()
        if handle is not None:
            handle.__exit__(None, None, None)
            handle = None
            bar.update(1)
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)
        bar.close()
    shards.write_index(out_dir, names, layout)
    leftover = [p for p, e in cache.items() if e["left"]]
    if leftover:
        raise RuntimeError(f"merge: deltas of {leftover[:3]} were not all written")
    return {
        "shards": names,
        "tensors": len(order),
        "adapted_tensors": len(owner),
        "digests": digests,
        "tensor_check": None if reference is None else {
            "max_relative_error": worst["error"], "worst_tensor": worst["tensor"], "tolerance": TENSOR_TOLERANCE},
        "config": config,
        "adapters": adapters,
        "seconds": time.perf_counter() - started,
        "mxfp4": mxfp4.note(mx, dtype, base_dir),
    }
