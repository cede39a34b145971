"""`finetune export ... --push-to-hub ORG/NAME`, tested up to the transport (HfApi's methods replaced):
the upload carries exactly the verified export and its card; a failed upload leaves the export
intact and exits 1; a bad repo id or a missing token fails before any work with exit 2."""

from __future__ import annotations

import httpx2
import pytest
from conftest import recipe_file, sft_recipe
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from finetune.cli import main
from finetune.recipe import read_recipe
from finetune.stages.sft import run_sft


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_mixtral, sft_file):
    tmp = tmp_path_factory.mktemp("push")
    return run_sft(read_recipe(recipe_file(tmp, **sft_recipe(tmp, tiny_mixtral, sft_file, sft={"max_steps": 1}))))


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(monkeypatch):
    """Fake transport: records create_repo and the bytes upload_folder would send (its own pattern filter)."""
    calls = {"create": [], "upload": []}

    def create_repo(self, repo_id, **kw):
        calls["create"].append((repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kw):
        from pathlib import Path

        root = Path(folder_path)
        rel = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        sent = filter_repo_objects(rel, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        calls["upload"].append((repo_id, {name: (root / name).read_bytes() for name in sent}, kw))
        if calls.get("fail"):
            raise calls["fail"]

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def test_push_uploads_exactly_the_verified_export(tmp_path, sft_run, hub, capsys):
    out = tmp_path / "instruct"
    assert main(["-q", "export", str(sft_run), "--output", str(out), "--dtype", "float32",
                 "--push-to-hub", "my-org/tiny-instruct", "--private"]) == 0
    assert hub["create"] == [("my-org/tiny-instruct", {"private": True, "repo_type": "model", "exist_ok": True})]
    (repo_id, sent, kw), = hub["upload"]
    assert repo_id == "my-org/tiny-instruct" and kw["repo_type"] == "model"
    on_disk = _snapshot(out)
    assert sent == on_disk  # every file, byte for byte, nothing else
    assert {"export.json", "config.json", "generation_config.json", "README.md"} <= set(sent)
    assert any(name.endswith(".safetensors") for name in sent)
    assert sent["README.md"].startswith(b"---\n") and b"# Instruct model fine-tuned from" in sent["README.md"]
    assert "pushed" in capsys.readouterr().out


@pytest.mark.parametrize("error", ["http", "os"])
def test_failed_upload_leaves_the_export_intact(tmp_path, sft_run, hub, capsys, error):
    response = httpx2.Response(503, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
    hub["fail"] = HfHubHTTPError("503 Service Unavailable", response=response) if error == "http" else OSError("connection reset")
    out = tmp_path / "instruct"
    assert main(["-q", "export", str(sft_run), "--output", str(out), "--dtype", "float32",
                 "--push-to-hub", "my-org/tiny-instruct"]) == 1
    err = capsys.readouterr().err
    assert "push to the hub repo my-org/tiny-instruct failed" in err and f"the export at {out} is intact" in err
    assert "Traceback" not in err
    (_, sent, _), = hub["upload"]
    assert _snapshot(out) == sent and (out / "export.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["instruct"]  # no temporary left beside it


@pytest.mark.parametrize("repo_id", ["just-a-name", "org/name/extra", "org/na me", "-org/name", "org/name--", "org/"])
def test_bad_repo_id_fails_before_any_work(tmp_path, sft_run, hub, capsys, repo_id):
    out = tmp_path / "instruct"
    assert main(["-q", "export", str(sft_run), "--output", str(out), f"--push-to-hub={repo_id}"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err
    assert not out.exists() and not hub["create"] and not hub["upload"]


def test_missing_token_fails_before_any_work(tmp_path, sft_run, hub, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "instruct"
    assert main(["-q", "export", str(sft_run), "--output", str(out), "--push-to-hub", "my-org/x"]) == 2
    assert "hf auth login" in capsys.readouterr().err
    assert not out.exists() and not hub["create"]


def test_private_without_push_is_refused(tmp_path, sft_run, capsys):
    assert main(["-q", "export", str(sft_run), "--output", str(tmp_path / "o"), "--private"]) == 2
    assert "--private applies to --push-to-hub" in capsys.readouterr().err
