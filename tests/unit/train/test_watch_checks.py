"""What watches a run, checked before anything loads: loggers, samples, early stopping; the console
line; every command-line option used."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
from pathlib import Path

import pytest
from conftest import REPO, recipe_file, sft_recipe

from finetune import cli
from finetune.errors import UserError
from finetune.recipe import read_recipe
from finetune.train import console
from finetune.train.args import trainer_args
from finetune.validate import check


def problems(tmp_path, model, data, **extra) -> list[str]:
    with pytest.raises(UserError) as info:
        check(read_recipe(recipe_file(tmp_path, **sft_recipe(tmp_path, model, data, **extra))))
    return [str(p) for p in info.value.problems]


def test_unknown_logger_with_did_you_mean_and_all_refused(tmp_path, tiny_mixtral, sft_file):
    found = problems(tmp_path, tiny_mixtral, sft_file, sft={"report_to": ["tensorbord", "all"]})
    assert any("sft.report_to: `tensorbord` is not a logger" in p and "did you mean `tensorboard`" in p for p in found)
    assert any("sft.report_to: `all`" in p for p in found)


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_logger_not_installed_names_the_extra(tmp_path, tiny_mixtral, sft_file, monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    found = problems(tmp_path, tiny_mixtral, sft_file, sft={"report_to": name})
    assert found == [f"sft.report_to: {name} is not installed: pip install 'finetune[{name}]' "
                     f"(or pip install -e '.[{name}]' in a checkout), or remove it from report_to"]


def test_shipped_mixtral_recipe_fails_in_validate_without_tensorboard(monkeypatch):
    """The issue's first failure: the model loaded, then the Trainer raised. Now validate says it."""
    monkeypatch.chdir(REPO)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == "tensorboard" else real(mod, *a))
    with pytest.raises(UserError) as info:
        check(read_recipe("recipes/mixtral-8x7b/sft.yaml"))
    assert [str(p) for p in info.value.problems] == [
        "sft.report_to: tensorboard is not installed: pip install 'finetune[tensorboard]' "
        "(or pip install -e '.[tensorboard]' in a checkout), or remove it from report_to"]


def test_samples_and_early_stopping_bad_input(tmp_path, tiny_mixtral, sft_file):
    found = problems(tmp_path, tiny_mixtral, sft_file, samples={"every": 0, "max_new_tokens": 0},
                     early_stopping={"metric": "eval_loss", "patience": 0, "mode": "lowest"})
    assert "samples.every: must be at least 1, got 0" in found
    assert "samples.max_new_tokens: must be at least 1, got 0" in found
    assert any(p.startswith("samples.prompts: a count (4) takes the first rows of data.eval") for p in found)
    assert any(p.startswith("early_stopping.metric: `eval_loss` is never logged: there is no eval data") for p in found)
    assert "early_stopping.patience: must be at least 1, got 0" in found
    assert any(p.startswith("early_stopping.mode: `lowest` is not one of auto, min, max") for p in found)
    found = problems(tmp_path, tiny_mixtral, sft_file, samples={"prompts": str(tmp_path / "missing.jsonl")})
    assert found == [f"samples.prompts: file not found: {tmp_path / 'missing.jsonl'} (relative to {tmp_path.cwd()})"]
    found = problems(tmp_path, tiny_mixtral, sft_file, samples={"prompts": 2.5})
    assert found == ["samples.prompts: expected int or str, got 2.5"]


def test_early_stopping_evaluates_with_each_checkpoint(tmp_path, tiny_mixtral, sft_file):
    raw = sft_recipe(tmp_path, tiny_mixtral, sft_file, sft={"save_steps": 7}, early_stopping={"metric": "rewards/accuracies"})
    raw["data"]["eval"] = [str(sft_file)]
    recipe = read_recipe(recipe_file(tmp_path, **raw))
    check(recipe)
    args = trainer_args(recipe, "sft", tmp_path, 0.0, True)
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_rewards/accuracies"
    assert args.greater_is_better and args.eval_strategy == "steps" and args.eval_steps == 7


def test_console_line_is_compact():
    logs = {"loss": 1.23456, "learning_rate": 1.9e-4, "grad_norm": 0.871, "aux_loss": 0.01234,
            **{f"routing/layer{i}/imbalance": 1.0 for i in range(32)}, "routing/imbalance_max": 1.2}
    line = console.train_line(10, 120, logs, 1234.4, 192.0)
    assert line == "step 10/120  loss 1.2346  lr 1.90e-04  grad 0.871  aux 0.01234  1,234 tok/s  ETA 3m12s"
    assert console.eval_line(10, 120, {"eval_loss": 2.5, "eval_runtime": 3.0}) == "eval at step 10/120: loss 2.5"


def test_rank_zero_prints_what_every_rank_would_and_per_rank_lines_say_their_rank():
    """Under several processes a message the same on every rank (dropped rows, the router warning,
    a library's deprecation) is printed by rank 0 only; errors and per-rank messages by every rank."""
    def record(level, per_rank=False):
        r = logging.LogRecord("finetune", level, __file__, 1, "dropped %d rows", (3,), None)
        if per_rank:
            r.per_rank = True
        return r

    assert not cli._every_rank(record(logging.WARNING)) and not cli._every_rank(record(logging.INFO))
    assert cli._every_rank(record(logging.ERROR)) and cli._every_rank(record(logging.WARNING, per_rank=True))
    assert cli._every_rank(record(logging.INFO, per_rank=True))
    assert cli._RankFormatter(1).format(record(logging.WARNING, per_rank=True)).startswith("[rank 1] ")
    assert cli._RankFormatter(1).format(record(logging.ERROR)).startswith("[rank 1] ")
    assert not cli._RankFormatter(0).format(record(logging.WARNING)).startswith("[rank")  # rank 0's alone: no prefix
    assert not cli._RankFormatter(1).format(record(logging.INFO, per_rank=True)).startswith("[rank")  # says it in its text


def _module_file(module: str) -> Path:
    path = REPO / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported(tree: ast.AST, module: str) -> dict[str, tuple[str, str | None]]:
    """name -> (module, function or None for a module) for the `from finetune... import` lines in tree."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out[alias.asname or alias.name] = (sub, None) if _module_file(sub).is_file() else (node.module, alias.name)
    return out


def _function(module: str, name: str) -> tuple[ast.FunctionDef, dict]:
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    found = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return found, {**_imported(tree, module), **{n.name: (module, n.name) for n in tree.body if isinstance(n, ast.FunctionDef)}}


def _reads(node: ast.AST, var: str, names: dict, seen: set) -> set[str]:
    """The attributes of `var` (the parsed options) read in node, and in every function of the
    package that node hands `var` to, followed call by call."""
    found = {n.attr for n in ast.walk(node)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == var}
    names = {**names, **_imported(node, "")}
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        passed = [i for i, a in enumerate(call.args) if isinstance(a, ast.Name) and a.id == var]
        if not passed:
            continue
        func = call.func
        target = (names.get(func.id) if isinstance(func, ast.Name) else
                  (names[func.value.id][0], func.attr) if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                  and func.value.id in names and names[func.value.id][1] is None else None)
        if target is None or target[1] is None or target in seen:
            continue
        seen.add(target)
        definition, its_names = _function(*target)
        found |= _reads(definition, definition.args.args[passed[0]].arg, its_names, seen)
    return found


def test_every_command_line_option_is_read_by_its_command():
    """Each option of each command is read where that command runs: its branch of cli.dispatch and
    every function the branch hands the parsed options to, followed call by call (an option that
    nobody reads is silently ignored, as `eval --passkey --output` was; `--output` is read by export,
    so a search of the whole package would not have found it)."""
    dispatch, names = _function("finetune.cli", "dispatch")
    branches = {n.test.comparators[0].value: n for n in dispatch.body
                if isinstance(n, ast.If) and ast.unparse(n.test).startswith("args.command ==")}
    main_reads = _reads(_function("finetune.cli", "main")[0], "args", names, {("finetune.cli", "dispatch")})
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(branches) == set(sub.choices)
    walked, unused = 0, []
    for command, p in [("", parser), *sub.choices.items()]:
        read = main_reads | (_reads(branches[command], "args", names, set()) if command else set())
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            walked += 1
            if action.dest not in read:
                unused.append(f"{command} {action.option_strings or action.dest}")
    assert walked > 40 and not unused, f"options their command never reads: {unused}"
