"""finetune/distributed.py's finish(): every command ends by waiting for the other ranks and taking the
process group down, instead of leaving it to the interpreter's exit (which can abort a rank: SIGABRT
from gloo's threads, seen in a 2-rank ZeRO-3 test). The 2-rank runs in tests/e2e/test_distributed.py
go through it for real; here one gloo process stands in for the launcher's ranks."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from finetune import distributed
from finetune.cli import main


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_finish_waits_for_the_other_ranks_then_takes_the_group_down(process_group, monkeypatch):
    order = []
    barrier, destroy = dist.barrier, dist.destroy_process_group
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: order.append("barrier") or barrier(*a, **k))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: order.append("destroy") or destroy(*a, **k))
    distributed.finish()
    assert order == ["barrier", "destroy"] and not dist.is_initialized()
    distributed.finish()  # nothing left to take down: a one-process run, or a second call
    assert order == ["barrier", "destroy"]


def test_a_command_ends_with_finish_only_when_it_returns(process_group, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(distributed, "finish", lambda: calls.append("finish"))
    assert main(["validate", "recipes/tiny-moe/sft.yaml"]) == 0
    assert calls == ["finish"]
    # a failed command does not wait at a barrier: its exit code makes the launcher stop the other ranks
    assert main(["validate", str(tmp_path / "missing.yaml")]) != 0
    assert calls == ["finish"]
