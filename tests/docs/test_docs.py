"""The docs check: every command the README and docs/*.md show is run, matched or validated; every local link exists.

    python -m pytest tests/docs/test_docs.py

The convention, for README.md and docs/*.md (the README's Tests section says it in short):
- A fenced ```bash block whose first line is `# runnable` holds commands on the bundled default,
  one per line. Cheap ones (`finetune --help`, `finetune validate ...`) are run here for real,
  offline, in this process (exit status 0). Ones that train or read a run (`sft`, `dpo`,
  `export`, `eval`, `routing`, `pipeline`) are not re-run: each must parse to exactly one of the
  commands a slow test runs (conftest.DOCUMENTED_RUNS; tests/e2e/test_pipeline.py takes its argv
  from there), compared as parsed by the real argument parser.
- A fenced ```bash block whose first line is `# needs: hub weights, GPUs` (or any `# needs: ...`)
  is not run: every recipe it names is checked with `finetune validate` offline (the bundled hub
  configs under model/configs make that work; a DPO recipe against a stand-in of the SFT run it
  names), every accelerate config it names exists, every line parses, and `export`/`eval` name
  the runs and exports the block's own recipes and commands write.
- Any other ```bash/```sh/```console block that calls `finetune` fails this check: mark it.
  Synopses with placeholders (RECIPE, RUN) go in ```text blocks, which are not checked.
- Every Markdown link or image to a local file (and its #anchor, if any) must exist.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import DOCUMENTED_RUNS, REPO, assume_tensorboard

from finetune.cli import build_parser, main

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE, NEEDS = "# runnable", "# needs:"
TRAINING = {"sft", "dpo", "export", "eval", "routing", "pipeline"}
README_MAX_LINES = 250

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every fenced block; lines ending in `\\` are joined."""
    out = []
    for match in FENCE.finditer(page.read_text(encoding="utf-8")):
        text = match.group(2).replace("\\\n", " ")
        out.append((match.group(1).strip(), [line.strip() for line in text.splitlines() if line.strip()]))
    return out


def finetune_argv(line: str) -> list[str] | None:
    """The arguments after `finetune` / `python -m finetune` / `accelerate launch ... -m finetune`, or None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # a line inside a quoted multi-line argument (curl -d '{...}'): plain words
        words = line.split("#")[0].split()
    for i, word in enumerate(words):
        if word == "finetune" or word.endswith("/finetune"):
            if i == 0 or (i > 0 and words[i - 1] == "-m"):
                return words[i + 1:]
    return None


def marked_blocks(marker: str) -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for info, lines in blocks(page):
            if info in ("bash", "sh", "console") and lines and lines[0].startswith(marker):
                found.append((f"{page.relative_to(REPO)}: {lines[0]}", lines[1:]))
    return found


def parsed(argv: list[str]) -> dict:
    try:
        return vars(build_parser().parse_args(argv))
    except SystemExit:
        raise AssertionError(f"`finetune {' '.join(argv)}` does not parse") from None


def test_every_block_that_calls_finetune_is_marked():
    unmarked = []
    for page in PAGES:
        for info, lines in blocks(page):
            if info not in ("bash", "sh", "console") or not lines:
                continue
            if lines[0].startswith((RUNNABLE, NEEDS)):
                continue
            unmarked += [f"{page.relative_to(REPO)}: {line}" for line in lines if finetune_argv(line) is not None]
    assert not unmarked, f"mark these blocks `{RUNNABLE}` or `{NEEDS} ...` (see tests/docs/test_docs.py): {unmarked}"


def test_the_docs_have_runnable_and_gpu_blocks():
    # the check cannot pass by finding nothing: the README's main job and its Mixtral job are blocks
    assert any("README.md" in where for where, _ in marked_blocks(RUNNABLE))
    assert any("README.md" in where for where, _ in marked_blocks(NEEDS))


def runnable_lines() -> list[tuple[str, list[str]]]:
    return [(where, finetune_argv(line)) for where, lines in marked_blocks(RUNNABLE) for line in lines
            if not line.startswith("#")]


@pytest.mark.parametrize("where,argv", runnable_lines(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_runnable_command(where, argv, monkeypatch, capsys):
    assert argv is not None, f"{where}: a `{RUNNABLE}` block holds only finetune commands"
    monkeypatch.chdir(REPO)  # the docs' commands name repository-relative paths
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    command = next((w for w in argv if not w.startswith("-")), None)
    if command in TRAINING:
        documented = [parsed(run) for run in DOCUMENTED_RUNS.values()]
        assert parsed(argv) in documented, (
            f"{where}: `finetune {' '.join(argv)}` trains or reads a run, so it must be one of the commands a slow "
            f"test runs (conftest.DOCUMENTED_RUNS: {list(DOCUMENTED_RUNS)}); add it there and to that test")
        return
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's --help exits
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, f"{where}: `finetune {' '.join(argv)}` exited {code}: {out.err[-2000:]}"


def test_documented_runs_are_what_the_slow_tests_run():
    # Each entry is there because a slow test takes its argv from it (tests/e2e/test_pipeline.py for
    # "pipeline"); an entry nothing reads would let the docs match a command nothing runs.
    sources = [p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("test_*.py") if p.name != "test_docs.py"]
    unused = [key for key in DOCUMENTED_RUNS if not any(f'DOCUMENTED_RUNS["{key}"]' in text for text in sources)]
    assert DOCUMENTED_RUNS and not unused, f"no test runs conftest.DOCUMENTED_RUNS{unused}"


def gpu_jobs() -> list[tuple[str, list[str]]]:
    return [(where, [line for line in lines if not line.startswith("#")]) for where, lines in marked_blocks(NEEDS)]


@pytest.mark.parametrize("where,lines", gpu_jobs(), ids=lambda v: v if isinstance(v, str) else "")
def test_gpu_job_recipes_validate_offline(where, lines, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assume_tensorboard(monkeypatch)  # the Mixtral recipes log to TensorBoard (installed in CI)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import yaml

    commands = []
    for line in lines:
        argv = finetune_argv(line)
        assert argv is not None, f"{where}: `{line}` is not a finetune command"
        words = shlex.split(line, comments=True)
        if "--config_file" in words:  # accelerate launch --config_file X ... -m finetune ...
            config = words[words.index("--config_file") + 1]
            assert (REPO / config).is_file(), f"{where}: accelerate config {config} does not exist"
        commands.append(argv)
    written: set[str] = set()  # run and export directories this block's commands write
    sft_runs: dict[str, Path] = {}
    for argv in commands:
        args = argparse.Namespace(**parsed(argv))
        if args.command in ("sft", "dpo"):
            raw = yaml.safe_load((REPO / args.recipe).read_text())
            check = ["validate", args.recipe, *[f"--set={o}" for o in args.overrides]]
            if args.command == "dpo":
                # validate checks a DPO recipe against the SFT run it names; stand one up from the
                # SFT recipe this block trained before it (as tests/unit/validate/test_validate.py does).
                parent = raw["from_run"]
                assert parent in sft_runs, f"{where}: {args.recipe} starts from {parent}, which no earlier line writes"
                check.append(f"--set=from_run={stand_in_run(sft_runs[parent], tmp_path / parent)}")
            else:
                sft_runs[raw["output_dir"]] = REPO / args.recipe
            assert main(check) == 0, f"{where}: finetune {' '.join(check)}: {capsys.readouterr().err[-2000:]}"
            written.add(raw["output_dir"])
        elif args.command == "export":
            assert args.run in written, f"{where}: export of {args.run}, which no line of the block writes"
            written.add(args.output)
        elif args.command in ("eval", "routing"):
            assert args.model in written, f"{where}: {args.command} of {args.model}, which no line of the block writes"
        else:
            raise AssertionError(f"{where}: `finetune {' '.join(argv)}`: only sft, dpo, export, eval, routing here")


def stand_in_run(sft_recipe: Path, run: Path) -> Path:
    """The files validate reads from a finished SFT run: its recipe and chain.json (no adapter)."""
    import yaml

    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(sft_recipe.read_text())
    base = yaml.safe_load(sft_recipe.read_text())["model"]["name_or_path"]
    (run / "chain.json").write_text(json.dumps([{"kind": "base", "model": base}, {"kind": "sft", "run": str(run)}]))
    return run


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def test_every_local_link_exists():
    broken, checked = [], 0
    for page in PAGES:
        text = FENCE.sub("", page.read_text(encoding="utf-8"))  # code is not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert checked > 10 and not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, unlinked


def test_readme_is_a_manual_not_a_notebook():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; topics go to docs/"


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command:") + 1]
    readme = [line for _, lines in blocks(REPO / "README.md") for line in lines]
    assert command in readme, f"README.md must show .ci/run's test command verbatim: {command}"


def recipe_keys(cls, prefix: str = "") -> list[str]:
    """Dotted paths of every recipe key, from the schema's dataclasses (finetune/recipe/schema.py)."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        path = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        nested = [a for a in (typing.get_args(hint) or [hint]) if dataclasses.is_dataclass(a)]
        if nested and nested[0].__name__ != "LoraGroup":  # a section: its keys, not its name
            keys += recipe_keys(nested[0], f"{path}.")
        else:  # a value, or a LoRA group (whose r/alpha/targets have their own table)
            keys.append(path)
    return keys


def test_recipes_reference_documents_every_key():
    from finetune.recipe import LoraGroup, Recipe

    page = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    import dataclasses

    keys = recipe_keys(Recipe) + [f.name for f in dataclasses.fields(LoraGroup)]
    missing = [k for k in keys if f"`{k}`" not in page]
    assert len(keys) > 20 and not missing, f"docs/recipes.md lacks {missing}"
