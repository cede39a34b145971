"""`finetune routing` on a trained run against its base: report files exist and parse."""

from __future__ import annotations

import json

from conftest import make_rows, recipe_file, sft_recipe, write_jsonl

from finetune.cli import main
from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft


def test_routing_report_run_vs_base(tmp_path, tiny_mixtral, sft_file):
    run = run_sft(read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file))))
    data = write_jsonl(tmp_path / "chat.jsonl", make_rows(16, seed=5))
    out = tmp_path / "report"
    assert main(["routing", str(run), "--data", str(data), "--compare", str(tiny_mixtral), "--output", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report and (out / "routing.md").read_text().strip()
    for png in ("expert_share.png", "repeated_experts.png", "compare.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the training logs carried the routing metrics too
    history = json.loads((run / "metrics.json").read_text())["log_history"]
    assert any("routing/layer0/entropy" in e or "routing/entropy_mean" in e for e in history)
