"""Entry point of the GPU proof kit: one part per call (bench/gpu_check.sh runs each with its own timeout).

    python bench/gpu_kit/kit.py env|tests|bench|qlora|profile --out DIR [--dry-run]
    python bench/gpu_kit/kit.py report --out DIR [--rc PART=CODE ...] [--command "..."]
    python bench/gpu_kit/kit.py dry-run --out DIR          # every part in turn on CPU, tiny shapes (tests/test_gpu_kit.py)

Parts write DIR/<part>.json (bench/gpu_kit/common.py: the envelope); `report` writes
DIR/report.json and DIR/results.md (rows for bench/RESULTS.md) and checks the schema.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "bench")):  # finetune and the gpu_kit package, from a checkout
    if p not in sys.path:
        sys.path.insert(0, p)
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notes PEFT triggers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARTS = ("env", "tests", "bench", "qlora", "profile")


def run_part(name: str, out: Path, dry_run: bool, timeout: float | None = None) -> dict:
    if name == "env":
        from gpu_kit import env

        return env.run(out, dry_run)
    if name == "tests":
        from gpu_kit import tests_part

        return tests_part.run(out, dry_run, **({"timeout": timeout} if timeout else {}))
    if name == "bench":
        from gpu_kit import layers

        return layers.run(out, dry_run)
    if name == "qlora":
        from gpu_kit import qlora_layers

        return qlora_layers.run(out, dry_run)
    if name == "profile":
        from gpu_kit import profile_step

        return profile_step.run(out, dry_run)
    raise ValueError(name)


def dry_run(out: Path) -> list[str]:
    """Every part on CPU at tiny shapes in this process (tests in a pytest subprocess), then the report;
    returns the schema problems (none when all is well)."""
    import time

    from gpu_kit import report

    rcs, walls = {}, {}
    for name in PARTS:
        t0 = time.perf_counter()
        try:
            run_part(name, out, True)
            rcs[name] = 0
        except Exception as exc:  # noqa: BLE001  (the report names the part that failed; the test fails on it)
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rcs[name] = 1
        walls[name] = round(time.perf_counter() - t0)
    return report.run(out, rcs, dry_run=True, command="python bench/gpu_kit/kit.py dry-run", walls=walls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=PARTS + ("report", "dry-run"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    ap.add_argument("--timeout", type=float, default=None, help="tests: pytest's own limit in seconds")
    ap.add_argument("--rc", action="append", default=[], help="report: PART=EXIT_CODE[:WALL_SECONDS] of each part run")
    ap.add_argument("--command", default=None, help="report: the command line to record")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "dry-run":
        problems = dry_run(args.out)
        return 1 if problems else 0
    if args.part == "report":
        from gpu_kit import report

        rcs, walls = {}, {}
        for kv in args.rc:  # PART=CODE or PART=CODE:WALL_SECONDS
            name, value = kv.split("=", 1)
            code, _, wall = value.partition(":")
            rcs[name], walls[name] = int(code), int(wall) if wall else None
        problems = report.run(args.out, rcs, args.dry_run, args.command, walls)
        return 1 if problems else 0
    data = run_part(args.part, args.out, args.dry_run, args.timeout)
    return 0 if data is not None else 1


if __name__ == "__main__":
    sys.exit(main())
