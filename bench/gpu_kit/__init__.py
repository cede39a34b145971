"""The GPU proof kit: the Python behind bench/gpu_check.sh (see docs/gpu.md).

    bench/gpu_check.sh               # on one CUDA GPU: environment, pytest -m gpu, benchmarks, a profiled step
    bench/gpu_check.sh --dry-run     # the same parts on CPU with tiny shapes (CI)

One module per part, each run as its own process with its own timeout by kit.py, each writing
one JSON file of the same envelope (common.py) into the output folder; report.py turns them
into Markdown rows for bench/RESULTS.md and checks the schema.
"""
