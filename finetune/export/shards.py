"""Safetensors checkpoints read and written one tensor at a time.

    finetune export RUN --output DIR   (finetune/export/merge.py reads the base and writes the export here)

Reading: a local checkpoint directory or a hub id already in the local hub cache (offline),
single-file or sharded with model.safetensors.index.json. Writing: shards planned up front from
the tensors' shapes, each file written tensor by tensor. safetensors' own `save_file` needs every
tensor of a file in memory at once (and copies each one to bytes), which would make the export's
peak memory a whole output shard more; the format is a JSON header and raw little-endian bytes,
so writing it in order is simple. The files are read back with safetensors' own reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers.utils.hub import convert_file_size_to_int

from finetune.errors import UserError
from finetune.export import mxfp4

INDEX = "model.safetensors.index.json"
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def checkpoint_dir(name_or_path: str) -> Path:
    """The directory holding the base model's safetensors: a local path, or the hub cache's snapshot."""
    path = Path(name_or_path)
    if path.is_dir():
        return path

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # noqa: BLE001 - any miss in the cache means the same thing to the user
        raise UserError(
            f"base model `{name_or_path}`: no such local directory and not in the local hub cache "
            f"({exc.__class__.__name__}); download it first (`hf download {name_or_path}`) or point the run at a local copy"
        ) from None


def shard_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files in index order."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{directory}: no model.safetensors or {INDEX}; export reads safetensors checkpoints only "
                    "(re-save the base with save_pretrained)")


def tensor_specs(files: list[Path]) -> dict[str, tuple[Path, tuple, torch.dtype]]:
    """key -> (file, shape, dtype) from the headers alone (no tensor data is read)."""
    specs = {}
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                specs[key] = (file, tuple(info["shape"]), CODE_DTYPES[info["dtype"]])
    return specs


def parse_size(size: str | int) -> int:
    try:
        return int(convert_file_size_to_int(size))
    except ValueError:
        raise UserError(f"--max-shard-size {size!r}: not a size; write e.g. 5GB or 500MB") from None


def group_into_shards(entries: list[tuple[str, tuple, torch.dtype]], max_bytes: int) -> list[list[tuple[str, tuple, torch.dtype]]]:
    """Greedy split in order, as transformers does: a tensor larger than the limit gets a shard of its own."""
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def planned_bytes(base_dir: Path, dtype: torch.dtype) -> int:
    """Bytes of the merged shards an export writes: every base tensor, floating ones in `dtype`
    (from the headers alone; the merge keeps the base's keys and shapes)."""
    specs = tensor_specs(shard_files(base_dir))
    mxfp4.decode_specs(specs)  # MXFP4 experts are written decoded
    return sum(_nbytes(shape, dtype if d.is_floating_point else d) for _, shape, d in specs.values())


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_raw(tensor)).hexdigest()


def _raw(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Writes one planned safetensors file; tensors must come in the planned order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        self.path, self.entries, self.next = path, entries, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in entries:
            end = offset + _nbytes(shape, dtype)
            header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, key: str, tensor: torch.Tensor) -> str:
        want_key, want_shape, want_dtype = self.entries[self.next]
        if key != want_key or tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
            raise RuntimeError(f"{self.path.name}: expected {want_key} {want_shape} {want_dtype}, got {key} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        raw = _raw(tensor)
        self.file.write(raw)
        self.next += 1
        return hashlib.sha256(raw).hexdigest()

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.entries):
            raise RuntimeError(f"{self.path.name}: {len(self.entries) - self.next} planned tensors were not written")


def write_index(directory: Path, names: list[str], shards: list[list[tuple]]) -> None:
    if len(names) == 1:
        return
    weight_map = {key: name for name, entries in zip(names, shards) for key, _, _ in entries}
    total = sum(_nbytes(shape, dtype) for entries in shards for _, shape, dtype in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_digests(directory: Path) -> dict[str, tuple[str, tuple, torch.dtype]]:
    """key -> (sha256, shape, dtype) of every tensor in a written checkpoint, read with safetensors itself."""
    out = {}
    for file in shard_files(directory):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (tensor_digest(t), tuple(t.shape), t.dtype)
                del t
    return out


LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(key: str) -> int | None:
    m = LAYER.search(key)
    return int(m.group(1)) if m else None


def free_bytes_estimate() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
