"""What every part of the GPU kit shares: the output envelope, versions, the device, timing helpers.

    (imported by bench/gpu_kit/*.py; run the kit with bench/gpu_check.sh)

Every part writes `<out>/<part>.json` with the same keys (ENVELOPE), so a part that timed out or
failed is visible as a missing file or a status, never as a silently absent figure.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCHEMA = 1
ENVELOPE = ("part", "schema", "status", "dry_run", "device", "started", "seconds", "command", "data", "skipped", "error")
STATUSES = ("ok", "partial", "failed", "timeout", "skipped")
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "huggingface_hub",
            "tokenizers", "safetensors", "pyarrow", "fsspec", "numpy", "triton", "pytest")
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense bf16 (DESIGN.md: the MFU reference)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def origin(name: str) -> str | None:
    """Where a package is imported from (the carried wheels' folder or the image's site-packages)."""
    spec = importlib.util.find_spec(name.replace("-", "_"))
    return str(Path(spec.origin).parent.parent) if spec and spec.origin else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    out.update({p: version(p) for p in PACKAGES})
    import torch

    out["torch_cuda"] = torch.version.cuda
    return out


def device_label(dry_run: bool) -> str:
    import torch

    if torch.cuda.is_available() and not dry_run:
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores){' dry run' if dry_run else ''}"


def load_bench_script(name: str):
    """A bench/*.py script as a module (bench/ is not a package): its functions, not its main()."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_steps(step, device: str, warmup: int, steps: int) -> list[float]:
    """Seconds per step, each bracketed by a device synchronisation, after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "step_s_all": times}


class Part:
    """Collects one part's result and writes its envelope (call write() as often as there is news)."""

    def __init__(self, name: str, out: Path, dry_run: bool):
        self.name, self.out, self.dry_run = name, Path(out), dry_run
        self.started, self.t0 = now(), time.perf_counter()
        self.data: dict = {}
        self.skipped: list[dict] = []
        self.error: str | None = None
        self.out.mkdir(parents=True, exist_ok=True)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def write(self, status: str) -> Path:
        assert status in STATUSES, status
        doc = dict(part=self.name, schema=SCHEMA, status=status, dry_run=self.dry_run,
                   device=device_label(self.dry_run), started=self.started,
                   seconds=round(time.perf_counter() - self.t0, 2), command=" ".join(sys.argv),
                   data=self.data, skipped=self.skipped, error=self.error)
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(path)  # a reader never sees half a file, even if this process is killed
        return path
