"""The curated MoE families end to end, regenerated and compared with the committed support matrix.

Slow (several minutes on 2 CPU cores): run with `pytest -m slow tests/e2e/test_families.py`.
`python bench/support_matrix.py --curated` is the same sweep; docs/support-matrix.md is its output.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import REPO


def bench_module():
    spec = importlib.util.spec_from_file_location("support_matrix", REPO / "bench" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comparable(cells: list[str]) -> list[str]:
    """A row without what varies by machine (float differences, seconds): pass/fail and the reasons."""
    return [re.sub(r"max diff [0-9.e+-]+", "max diff", c) for c in cells]


@pytest.mark.slow
def test_curated_families_pass_every_column_and_match_the_committed_matrix(tmp_path):
    bench = bench_module()
    committed = bench.read_rows(REPO / "docs" / "support-matrix.md")
    curated = [t for t in bench.CURATED if t in bench.tiny_configs.fused_expert_types()]
    assert {"mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"} <= set(curated)
    out = tmp_path / "matrix.md"
    bench.main(["--types", *curated, "--out", str(out)])
    regenerated = bench.read_rows(out)
    for model_type in curated:
        row = regenerated[model_type]
        assert all(c.startswith("pass") for c in row[1:]), (model_type, row)
        assert comparable(row) == comparable(committed[model_type]), model_type
