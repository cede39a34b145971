"""Part `profile`: one fast-path SFT step of the 4-layer benchmark under torch.profiler: the top
kernels, the share of device time in grouped GEMMs, and the host synchronisations in the step.

    python bench/gpu_kit/kit.py profile --out DIR [--dry-run]      # writes DIR/profile.json

On CUDA the figures are device (kernel) times; in a dry run, CPU op times at tiny shapes. Host
syncs are counted from the profiler's own events: CUDA runtime synchronisations and
`aten::_local_scalar_dense` (every `.item()`/`.tolist()` of a device tensor lands there).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gpu_kit.common import H100_BF16_DENSE_TFLOPS, Part, load_bench_script, sync
from gpu_kit.layers import DRY, FULL, sft_step

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "aten::_local_scalar_dense")
GROUPED_OPS = ("aten::_grouped_mm",)
TOP = 20


def _times(evt, cuda: bool) -> tuple[float, float]:
    """(self, total) time in microseconds: device time on CUDA (torch >= 2.4 names), CPU time otherwise."""
    if cuda:
        return (getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0),
                getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0))
    return evt.self_cpu_time_total, evt.cpu_time_total


def analyse(prof, cuda: bool) -> dict:
    events = prof.key_averages()
    total_self = sum(_times(e, cuda)[0] for e in events)
    ranked = sorted(events, key=lambda e: _times(e, cuda)[0], reverse=True)
    top = [{"name": e.key[:160], "calls": e.count, "self_ms": _times(e, cuda)[0] / 1e3,
            "share": _times(e, cuda)[0] / total_self if total_self else None} for e in ranked[:TOP] if _times(e, cuda)[0] > 0]
    grouped = sum(_times(e, cuda)[1] for e in events if e.key in GROUPED_OPS)
    syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS or e.key.startswith("cudaMemcpy") and "Async" not in e.key}
    try:  # the figures above do not depend on the table; a renamed sort key must not lose them
        table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=TOP,
                             max_name_column_width=80)
    except Exception as exc:  # noqa: BLE001
        table = f"(the profiler's table failed: {type(exc).__name__}: {exc})"
    return {"time_kind": "device (kernels)" if cuda else "cpu (ops)", "total_self_ms": total_self / 1e3,
            "top": top, "grouped_gemm_ms": grouped / 1e3, "grouped_gemm_share": grouped / total_self if total_self else None,
            "host_syncs": syncs, "host_sync_count": sum(syncs.values()),
            "table": table}


def run(out, dry_run: bool) -> dict:
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from finetune.lora.fast_experts import enable_fast_expert_lora

    el = load_bench_script("expert_lora")
    part = Part("profile", out, dry_run)
    cuda = torch.cuda.is_available() and not dry_run
    a = SimpleNamespace(**(DRY if dry_run else FULL), device="cuda" if cuda else "cpu", grad_checkpointing=False,
                        peak_tflops=H100_BF16_DENSE_TFLOPS)
    if not cuda:
        torch.set_num_threads(1)
        part.skip("kernel (device) times", "no CUDA: CPU op times at tiny shapes")
    base = el.build_model(a)
    base.set_experts_implementation("grouped_mm")
    model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=el.ATTENTION,
                                            target_parameters=el.EXPERTS))
    part.data.update(path="fast", mode="sft", shapes={k: getattr(a, k) for k in FULL},
                     fast_layers=enable_fast_expert_lora(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device, generator=torch.Generator(device=a.device).manual_seed(1))
    for _ in range(2 if cuda else 1):  # warm-up: allocator, cuBLAS handles, lazy kernels
        sft_step(model, opt, ids)
    sync(a.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        loss = sft_step(model, opt, ids)
        sync(a.device)
    part.data["loss"] = float(loss)
    part.data.update(analyse(prof, cuda))
    print(part.data["table"], flush=True)
    print(f"profile: grouped GEMMs {100 * (part.data['grouped_gemm_share'] or 0):.1f}% of {part.data['time_kind']} time; "
          f"host syncs {part.data['host_syncs']}", flush=True)
    part.write("ok")
    return part.data
