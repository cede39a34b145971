"""A pytest plugin that appends each test's outcome to a JSON-lines file as soon as it is known, so
the kit keeps the finished tests' results when a later test hangs and the run is killed.

    python -m pytest -p gpu_kit.pytest_record ...      # file: $GPU_KIT_TESTS_JSONL (bench/gpu_kit/tests_part.py sets it)
"""

from __future__ import annotations

import json
import os


def _append(rec: dict) -> None:
    path = os.environ.get("GPU_KIT_TESTS_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def pytest_collectreport(report):
    # a test file that cannot even be imported (a missing or mismatched package on the GPU machine)
    if report.failed:
        _append({"nodeid": report.nodeid, "name": report.nodeid, "outcome": "error", "when": "collect",
                 "duration_s": 0.0, "properties": {}, "message": report.longreprtext[-3000:]})


def pytest_runtest_logreport(report):
    # one line per test: its call phase, or the setup/teardown phase that skipped or failed it
    if not (report.when == "call" or (report.when == "setup" and not report.passed)
            or (report.when == "teardown" and report.failed)):
        return
    rec = {"nodeid": report.nodeid, "name": report.nodeid.split("::")[-1], "outcome": report.outcome,
           "when": report.when, "duration_s": round(report.duration, 3),
           "properties": {k: v for k, v in report.user_properties}}
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        rec["reason"] = reason.removeprefix("Skipped: ")
    elif report.failed:
        rec["message"] = report.longreprtext[-3000:]
    _append(rec)
