"""Run directories never lose a user's files: refusals, write-beside-and-swap, self-contained chains, adapter checks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_pairs, make_rows, recipe_file, sft_recipe, write_jsonl
from safetensors.torch import load_file, save_file

from finetune import cli, runs
from finetune.errors import CheckFailed, UserError
from finetune.export import export
from finetune.recipe import read_recipe
from finetune.runs.adapter_check import check_saved_adapter
from finetune.stages.dpo import run_dpo
from finetune.stages.sft import run_sft


def tree(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: 'byte-identical' means this compares equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dpo_recipe_dict(tmp: Path, sft: Path, pref: Path, out: Path, **dpo) -> dict:
    return dict(output_dir=str(out), from_run=str(sft), data={"train": [str(pref)], "max_length": 64},
                lora={"attention": {"r": 4, "alpha": 8}, "experts": {"r": 4, "alpha": 8}},
                dpo={"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-2, **dpo})


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory, tiny_mixtral, sft_file, pref_file):
    """runs/sft and runs/dpo side by side, finished; tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("rundir")
    sft = run_sft(read_recipe(recipe_file(tmp, "sft.yaml", **sft_recipe(tmp, tiny_mixtral, sft_file,
                                                                          output_dir=str(tmp / "runs" / "sft")))))
    run_dpo(read_recipe(recipe_file(tmp, "dpo.yaml", **dpo_recipe_dict(tmp, sft, pref_file, tmp / "runs" / "dpo"))))
    return tmp / "runs"


@pytest.fixture
def runs_copy(tmp_path, chain_dir) -> Path:
    shutil.copytree(chain_dir, tmp_path / "runs")
    return tmp_path / "runs"


def sft_cli(tmp_path, model, data, *args, **extra) -> int:
    path = recipe_file(tmp_path, "sft-cli.yaml", **sft_recipe(tmp_path, model, data, **extra))
    return cli.main(["-q", "sft", str(path), *args])


# ---- refusals: each before any model load, nothing touched ----

def test_output_dir_dot_with_overwrite_keeps_recipe_and_data(tmp_path, tiny_mixtral, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    data = write_jsonl(work / "sft.jsonl", make_rows(8))
    recipe = recipe_file(work, **sft_recipe(work, tiny_mixtral, Path("sft.jsonl")))
    monkeypatch.chdir(work)
    before = tree(work)
    assert cli.main(["-q", "sft", "recipe.yaml", "--set", "output_dir=.", "--overwrite"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert tree(work) == before and recipe.is_file() and data.is_file()


def test_ancestor_of_cwd_is_refused(tmp_path, tiny_mixtral, sft_file, monkeypatch, capsys):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, "--overwrite", output_dir=str(tmp_path / "a")) == 2
    assert "ancestors" in capsys.readouterr().err and deep.is_dir()


def test_base_model_dir_and_inside_it_are_refused(tmp_path, tiny_mixtral, sft_file, capsys):
    before = tree(tiny_mixtral)
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, "--overwrite", output_dir=str(tiny_mixtral)) == 2
    assert "the base model" in capsys.readouterr().err
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, output_dir=str(tiny_mixtral / "run")) == 2
    assert "lies inside the base model" in capsys.readouterr().err
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, "--overwrite", output_dir=str(tiny_mixtral.parent)) == 2
    assert tree(tiny_mixtral) == before


def test_symlink_to_the_model_is_refused(tmp_path, tiny_mixtral, sft_file, capsys):
    link = tmp_path / "looks-new"
    link.symlink_to(tiny_mixtral, target_is_directory=True)
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, "--overwrite", output_dir=str(link)) == 2
    assert "is the base model" in capsys.readouterr().err and (tiny_mixtral / "config.json").is_file()


def test_resume_from_checkpoint_key_points_to_the_flag(tmp_path, tiny_mixtral, sft_file, capsys):
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, sft={"resume_from_checkpoint": "x"}) == 2
    assert "--resume" in capsys.readouterr().err and not list(tmp_path.glob("*sft-run*"))


def test_data_directory_and_foreign_dir_are_refused(tmp_path, tiny_mixtral, capsys):
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "sft.jsonl", make_rows(8))
    assert sft_cli(tmp_path, tiny_mixtral, data, "--overwrite", output_dir=str(tmp_path / "data")) == 2
    assert "data file" in capsys.readouterr().err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert sft_cli(tmp_path, tiny_mixtral, data, "--overwrite", output_dir=str(notes)) == 2
    assert "not a run of this project" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "mine" and data.is_file()


def test_output_below_a_file_is_refused(tmp_path, tiny_mixtral, sft_file, chain_dir, capsys):
    (tmp_path / "plain").write_text("x")
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, output_dir=str(tmp_path / "plain" / "run")) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and str(tmp_path / "plain") in err
    assert cli.main(["-q", "export", str(chain_dir / "dpo"), "--output", str(tmp_path / "plain" / "exp")]) == 2
    assert "--output" in capsys.readouterr().err and (tmp_path / "plain").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused(tmp_path, tiny_mixtral, sft_file, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, output_dir=str(locked / "run")) == 2
    assert "permission denied" in capsys.readouterr().err


def test_unwritable_parent_is_refused_as_root_too(tmp_path, tiny_mixtral, sft_file, monkeypatch, capsys):
    """root passes every permission check, so the check's answer is faked here (the path the code takes is real)."""
    from finetune.runs import outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != tmp_path)
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, output_dir=str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "permission denied" in err and str(tmp_path) in err and not (tmp_path / "run").exists()


def test_dpo_onto_its_parent_and_run_inside_run_are_refused(tmp_path, runs_copy, pref_file, capsys):
    sft = runs_copy / "sft"
    before = tree(sft)
    for out in (sft, sft / "dpo", runs_copy):
        path = recipe_file(tmp_path, "dpo.yaml", **dpo_recipe_dict(tmp_path, sft, pref_file, out))
        assert cli.main(["-q", "dpo", str(path), "--overwrite"]) == 2
        assert "parent run" in capsys.readouterr().err
    assert tree(sft) == before


def test_export_onto_or_into_its_run_is_refused(runs_copy, capsys):
    dpo, sft = runs_copy / "dpo", runs_copy / "sft"
    before = tree(runs_copy)
    for target in (dpo, dpo / "export", sft, runs_copy):
        assert cli.main(["-q", "export", str(dpo), "--output", str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "never replaced" in err or "lies inside" in err, err
    assert tree(runs_copy) == before


# ---- check before claim, swap on success only ----

def test_bad_preference_row_leaves_previous_dpo_run_byte_identical(tmp_path, runs_copy, capsys):
    pairs = make_pairs(8)
    pairs[3]["rejected"] = pairs[3]["chosen"]  # chosen == rejected: a bad row
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs)
    before = tree(runs_copy)
    path = recipe_file(tmp_path, "dpo.yaml", **dpo_recipe_dict(tmp_path, runs_copy / "sft", bad, runs_copy / "dpo"))
    assert cli.main(["-q", "dpo", str(path), "--overwrite"]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert tree(runs_copy) == before  # no staging directory either


def test_failed_run_leaves_nothing_and_old_run_stays(tmp_path, runs_copy, tiny_mixtral, sft_file, monkeypatch):
    from trl import SFTTrainer

    before = tree(runs_copy)

    def broken(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(SFTTrainer, "train", broken)
    recipe = read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file,
                                                            output_dir=str(runs_copy / "sft"))))
    with pytest.raises(RuntimeError, match="boom"):
        run_sft(recipe, overwrite=True)
    assert tree(runs_copy) == before
    monkeypatch.undo()
    fresh = read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file,
                                                           output_dir=str(tmp_path / "new"))))
    monkeypatch.setattr(SFTTrainer, "train", broken)
    with pytest.raises(RuntimeError):
        run_sft(fresh)
    assert sorted(p.name for p in tmp_path.iterdir() if "new" in p.name) == []


def test_overwrite_swaps_in_the_new_run_on_success(tmp_path, runs_copy, tiny_mixtral, sft_file):
    old = (runs_copy / "sft" / "adapter_model.safetensors").read_bytes()
    recipe = read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, tiny_mixtral, sft_file, seed=7,
                                                            output_dir=str(runs_copy / "sft"))))
    run_sft(recipe, overwrite=True)
    assert (runs_copy / "sft" / "adapter_model.safetensors").read_bytes() != old
    assert sorted(p.name for p in runs_copy.iterdir()) == ["dpo", "sft"]  # no staging, no old copy
    assert not (runs_copy / "sft" / "checkpoints").exists()


# ---- self-contained chains ----

def test_chain_is_relative_with_sha256(chain_dir):
    chain = json.loads((chain_dir / "dpo" / "chain.json").read_text())
    assert [link.get("run") for link in chain] == [None, "../sft", "."]
    assert chain[2]["sha256"] == runs.sha256(chain_dir / "dpo" / "adapter_model.safetensors")
    assert "from_run: ../sft" in (chain_dir / "dpo" / "recipe.yaml").read_text()


def test_copied_run_exports_from_its_own_files(tmp_path, runs_copy, chain_dir):
    moved = tmp_path / "moved"
    runs_copy.rename(moved)
    run = runs.read_run(moved / "dpo")
    assert run.recipe.from_run == str((moved / "sft").resolve())
    assert [link["run"] for link in run.chain[1:]] == [str(moved / "sft"), str(moved / "dpo")]
    weights = moved / "dpo" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated copy
    with pytest.raises(UserError, match="adapter_model.safetensors: its sha256 differs"):
        export(str(moved / "dpo"), str(tmp_path / "exp"), dtype="float32")
    assert not (tmp_path / "exp").exists()
    export(str(chain_dir / "dpo"), str(tmp_path / "exp-original"), dtype="float32")  # the original still exports


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "dpo" / "chain.json").write_text("{not json"), "chain.json: not valid JSON"),
    (lambda r: (r / "dpo" / "chain.json").write_text('{"kind": "base"}'), "chain.json: not a run chain"),
    (lambda r: (r / "sft" / "adapter_config.json").write_text("{"), "adapter_config.json: not valid JSON"),
    (lambda r: (r / "dpo" / "recipe.yaml").write_text("a: [b"), "recipe.yaml: not valid YAML"),
    (lambda r: (r / "dpo" / "recipe.yaml").unlink(), "recipe.yaml: missing"),
])
def test_corrupt_run_files_are_named(tmp_path, runs_copy, damage, message, capsys):
    damage(runs_copy)
    assert cli.main(["-q", "export", str(runs_copy / "dpo"), "--output", str(tmp_path / "exp")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "exp").exists()


def test_parent_recipe_missing_is_named_by_dpo(tmp_path, runs_copy, pref_file, capsys):
    (runs_copy / "sft" / "recipe.yaml").write_text(": : :")
    path = recipe_file(tmp_path, "dpo.yaml", **dpo_recipe_dict(tmp_path, runs_copy / "sft", pref_file, tmp_path / "d"))
    assert cli.main(["-q", "dpo", str(path)]) == 2
    assert "sft/recipe.yaml: not valid YAML" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_truncated_adapter_without_sha_is_a_user_error(tmp_path, runs_copy, capsys):
    chain_file = runs_copy / "dpo" / "chain.json"
    chain = json.loads(chain_file.read_text())
    chain_file.write_text(json.dumps([{k: v for k, v in link.items() if k != "sha256"} for link in chain]))
    weights = runs_copy / "dpo" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    assert cli.main(["-q", "export", str(runs_copy / "dpo"), "--output", str(tmp_path / "exp")]) == 2
    assert "cannot load the adapter" in capsys.readouterr().err


# ---- the saved adapter is checked before a run is finished ----

def test_adapter_check_catches_empty_and_nan_tensors(runs_copy, tiny_mixtral):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_mixtral)
    path = runs_copy / "sft" / "adapter_model.safetensors"
    good = load_file(path)
    assert check_saved_adapter(runs_copy / "sft", config) == len(good)
    key = next(k for k in good if "experts" in k)
    for bad in (torch.empty(0), torch.full_like(good[key], float("nan"))):
        save_file({**good, key: bad}, path)
        with pytest.raises(CheckFailed, match=key.replace(".", r"\.")):
            check_saved_adapter(runs_copy / "sft", config)


def test_empty_adapter_save_exits_1_and_run_is_not_finished(tmp_path, tiny_mixtral, sft_file, monkeypatch, capsys):
    """As DeepSpeed ZeRO-3 once did: every tensor of shape (0,), saved as a 'success'."""
    from finetune.train import save

    monkeypatch.setattr(save, "model_state_for_save",
                        lambda trainer: {k: torch.empty(0) for k in trainer.model.state_dict()})
    assert sft_cli(tmp_path, tiny_mixtral, sft_file, output_dir=str(tmp_path / "zero")) == 1
    assert "shape (0,)" in capsys.readouterr().err
    assert not any("zero" in p.name for p in tmp_path.iterdir())
