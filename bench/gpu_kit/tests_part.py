"""Part `tests`: `pytest -m gpu tests/gpu` in a subprocess with its own timeout; each test's outcome,
duration, recorded figures (record_property) and skip reason into tests.json.

    python bench/gpu_kit/kit.py tests --out DIR [--dry-run] [--timeout S]      # writes DIR/tests.json

In a dry run the tests run with GPU_KIT_DRY_RUN=1: tiny shapes on the CPU, CUDA-only checks skipped by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from gpu_kit.common import REPO, Part

# Quick files first, the minutes-long pipeline last, so a timeout costs the fewest results (pytest
# runs named files in the order given); any other file in tests/gpu runs before the pipeline.
FIRST = ["test_gpu_expert_path.py", "test_gpu_qlora.py", "test_gpu_placement.py"]
LAST = ["test_gpu_pipeline.py"]


def ordered_files() -> list[str]:
    found = sorted(p.name for p in (REPO / "tests" / "gpu").glob("test_*.py"))
    names = [n for n in FIRST if n in found] + [n for n in found if n not in FIRST + LAST] + [n for n in LAST if n in found]
    return [f"tests/gpu/{n}" for n in names]


def run(out, dry_run: bool, timeout: float = 240.0) -> dict:
    part = Part("tests", out, dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "tests.jsonl"
        env = dict(os.environ, GPU_KIT_TESTS_JSONL=str(jsonl), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench"), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
        if dry_run:
            env["GPU_KIT_DRY_RUN"] = "1"
        # -o addopts= drops pyproject's "-m 'not slow'" so that -m gpu alone selects; a test file that
        # cannot be imported is recorded (pytest_record) and the other files still run
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "gpu", *ordered_files(), "-p", "gpu_kit.pytest_record",
               "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        part.data["pytest_command"] = " ".join(cmd[1:])
        print("tests: " + part.data["pytest_command"], flush=True)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and anything it started
            proc.wait()
            rc, status = None, "timeout"
            part.error = f"pytest killed after {timeout:.0f} s; the tests finished before that are kept"
        tests = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    part.data["returncode"] = rc
    part.data["tests"] = tests
    part.data["counts"] = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
    for t in tests:
        if t["outcome"] == "skipped":
            part.skip(t["name"], t.get("reason", ""))
    if status == "failed" and rc not in (0, 1):  # 1: some test failed; other codes: pytest itself could not run
        part.error = f"pytest exited with {rc} (not a test failure: collection, usage or internal error)"
    if status == "ok" and not tests:
        status, part.error = "failed", "pytest ran no test"
    part.write(status)
    return part.data
