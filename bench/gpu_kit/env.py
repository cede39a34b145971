"""Part `env`: the machine, driver, library versions (and where each was imported from), and the
measured bf16 matrix-product ceiling that MFU figures can be read against.

    python bench/gpu_kit/kit.py env --out DIR [--dry-run]      # writes DIR/env.json
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess

from gpu_kit.common import PACKAGES, Part, origin, versions


def nvidia_smi() -> dict | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    return dict(zip(query.split(","), [v.strip() for v in out.splitlines()[0].split(",")])) if out else None


def matmul_tflops(device: str, n: int, dtype, warmup: int = 3, reps: int = 10) -> dict:
    """Median rate of an n x n x n product on random data (never zeros: they run faster)."""
    import time

    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    times = []
    for i in range(warmup + reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            sec = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            a @ b
            sec = time.perf_counter() - t0
        if i >= warmup:
            times.append(sec)
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "median_s": med, "tflops": 2 * n**3 / med / 1e12}


def run(out, dry_run: bool) -> dict:
    import torch

    part = Part("env", out, dry_run)
    cuda = torch.cuda.is_available() and not dry_run
    d = part.data
    d["versions"] = versions()
    d["imported_from"] = {p: origin(p) for p in PACKAGES if p not in ("pytest",)}
    d["python_executable"] = os.sys.executable
    d["platform"] = platform.platform()
    d["cpu_count"] = os.cpu_count()
    d["nvidia_smi"] = nvidia_smi()
    d["pythonpath"] = os.environ.get("PYTHONPATH")
    if cuda:
        from finetune.lora.grouped_mm import cuda_grouped_kernel

        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                    "memory_gib": p.total_memory / 2**30, "l2_mib": getattr(p, "L2_cache_size", 0) / 2**20,
                    "bf16": torch.cuda.is_bf16_supported(), "grouped_mm_kernel": cuda_grouped_kernel(torch.device("cuda"))}
        d["matmul"] = matmul_tflops("cuda", 8192, torch.bfloat16)
    else:
        d["gpu"] = None
        part.skip("gpu properties", "no CUDA device" + (" (dry run)" if dry_run else ""))
        part.skip("8192^3 bf16 matmul ceiling", "CUDA only; a 256^3 float32 product on the CPU exercises the code")
        d["matmul"] = matmul_tflops("cpu", 256, torch.float32, warmup=1, reps=3)
    print(f"env: {part.data['versions']}\n     gpu: {d['gpu']}\n     matmul: {d['matmul']['tflops']:.1f} TFLOP/s "
          f"({d['matmul']['n']}^3 {d['matmul']['dtype']})\n     nvidia-smi: {d['nvidia_smi']}", flush=True)
    part.write("ok")
    return part.data
