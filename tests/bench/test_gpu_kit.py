"""The GPU proof kit's dry run (bench/gpu_kit, bench/gpu_check.sh --dry-run): every part runs on the
CPU at tiny shapes and writes the files a GPU run writes, in the same schema, with the CUDA-only
checks reported as skipped by name.

Run: `pytest -m slow tests/bench/test_gpu_kit.py` (CPU, offline; about a minute of CPU: a nested pytest
of tests/gpu and three tiny training benchmarks). Slow-marked: .ci/run also runs the dry run itself.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from gpu_kit import kit, report  # noqa: E402  (bench/ is not a package: its folder goes on the path first)

FILES = {"env.json", "tests.json", "bench.json", "qlora.json", "profile.json", "report.json", "results.md"}
CUDA_ONLY = {"test_fast_path_has_no_host_sync", "test_eval_and_routing_place_the_model_in_16_bit_on_the_gpu",
             "test_bundled_pipeline_in_bf16_on_the_gpu"}


@pytest.mark.slow
def test_dry_run_writes_every_part_in_the_gpu_schema(tmp_path):
    problems = kit.dry_run(tmp_path)
    assert problems == []
    assert {p.name for p in tmp_path.iterdir()} == FILES
    docs = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert all(d["dry_run"] is True and d["status"] == "ok" for d in docs.values()), {k: d["status"] for k, d in docs.items()}
    assert {k: p["status"] for k, p in docs["report"]["data"]["parts"].items()} == dict.fromkeys(kit.PARTS, "ok")

    tests = {t["name"]: t for t in docs["tests"]["data"]["tests"]}
    assert {n for n, t in tests.items() if t["outcome"] == "skipped"} == CUDA_ONLY
    assert {s["name"] for s in docs["tests"]["skipped"]} == CUDA_ONLY
    assert all(t["outcome"] == "passed" for n, t in tests.items() if n not in CUDA_ONLY) and len(tests) == 6
    # the fast path's errors against float32 were measured and recorded, for it and for stock PEFT
    props = tests["test_fast_path_matches_stock_peft_in_bf16"]["properties"]
    assert 0 < props["rel_err_experts_B_fast"] < 0.1 and 0 < props["rel_err_experts_B_stock"] < 0.1

    bench = docs["bench"]["data"]
    assert [(r["path"], r["mode"]) for r in bench["rows"]] == [(p, m) for p in ("peft-grouped_mm", "fast", "attn-only")
                                                              for m in ("sft", "dpo")]
    for r in bench["rows"]:
        assert r["tokens_per_s"] > 0 and r["loss_finite"] and len(r["step_s_all"]) == bench["shapes"]["steps"]
        assert r["fast_layers"] == (bench["shapes"]["layers"] if r["path"] == "fast" else 0)
    assert set(bench["targets"]) == {f"{m}:{k}" for m in ("sft", "dpo") for k in
                                     ("fast_vs_attn_only_tokens_per_s", "fast_vs_attn_only_peak_memory",
                                      "fast_vs_stock_tokens_per_s", "fast_mfu")}
    q = docs["qlora"]["data"]
    assert q["fast_layers"] == q["shapes"]["layers"] and q["resident_gib"]["nf4_experts"] > 0 and q["tokens_per_s"] > 0
    prof = docs["profile"]["data"]
    assert prof["fast_layers"] == bench["shapes"]["layers"] and 0 < prof["grouped_gemm_share"] < 1
    md = (tmp_path / "results.md").read_text()
    assert "DRY RUN: CPU, tiny shapes, not a GPU figure" in md and md.count("| fast |") == 2


def test_schema_check_names_what_is_missing(tmp_path):
    doc = {"part": "bench", "schema": 1, "status": "ok", "dry_run": True, "device": "cpu", "started": "", "seconds": 1,
           "command": "", "data": {"shapes": {}, "device": "cpu", "peak_tflops": 989, "targets": {},
                                   "rows": [{"path": "fast", "mode": "sft", "tokens_per_s": 1.0}]},
           "skipped": [{"name": "x"}], "error": None}
    problems = report.check(doc, "bench")
    assert "bench: every skipped entry needs exactly a name and a reason" in problems
    assert "bench: rows[0] lacks step_s_median" in problems and "bench: rows[0] lacks peak_gib" in problems
    del doc["error"]
    assert report.check(doc, "bench") == ["bench: missing key error"]
    # a part the script ran that left no file is a problem, never a silent gap
    assert report.run(tmp_path, {"bench": 124}, dry_run=True) == ["bench: no bench.json (exit status 124)"]
    assert json.loads((tmp_path / "report.json").read_text())["data"]["parts"]["bench"]["status"] == "timeout"
