"""The package's imports run one way, top to bottom, with no circles (the layout in README.md).

Built from `ast`, so imports inside functions count as much as those at the top of a file. A unit
is a top-level module or subpackage of finetune/ (files and folders as the README's map draws them);
cycles are also checked module by module. LAYERS is the declared order: a unit may import units
of its own layer or below, never above; a new module must be placed in it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import REPO

# Top to bottom. Units on one line may import each other (without circles).
LAYERS = [
    ["cli", "__main__"],
    ["pipeline"],
    ["stages"],
    ["validate", "train", "export", "eval", "routing", "plan"],
    ["load"],
    ["qlora"],
    ["lora"],
    ["modeling", "moe", "balancing", "data", "hub", "runs", "distributed", "guards"],
    ["recipe"],
    ["errors"],
]


def module_names(root: Path) -> dict[str, Path]:
    """finetune.x.y -> file, for every module under root/finetune (packages as their __init__)."""
    out = {}
    for path in (root / "finetune").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The finetune modules `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_problems(root: Path) -> list[str]:
    """Every import against LAYERS, every unit LAYERS does not place, and any import circle."""
    modules = module_names(root)
    level = {unit: i for i, line in enumerate(LAYERS) for unit in line}
    module_graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    problems, unit_graph = [], {}
    for module, targets in sorted(module_graph.items()):
        unit = unit_of(module)
        if unit == "__init__":
            if targets:
                problems.append(f"finetune/__init__.py imports {sorted(targets)}: the package root imports nothing")
            continue
        if unit not in level:
            problems.append(f"{module}: unit `{unit}` is not placed in LAYERS (tests/unit/test_layers.py)")
            continue
        for target in sorted(targets):
            other = unit_of(target)
            if other == unit or other == "__init__":
                continue
            unit_graph.setdefault(unit, set()).add(other)
            if other in level and level[other] < level[unit]:
                problems.append(f"{module} imports {target}: `{unit}` may not import `{other}`, a layer above it")
    for graph, what in ((unit_graph, "units"), (module_graph, "modules")):
        cycle = find_cycle(graph)
        if cycle:
            problems.append(f"import circle between {what}: {' -> '.join(cycle)}")
    return problems


def test_imports_run_one_way_with_no_circles():
    assert layer_problems(REPO) == []


def test_an_upward_import_or_a_circle_is_caught(tmp_path):
    shutil.copytree(REPO / "finetune", tmp_path / "finetune", ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_problems(tmp_path) == []
    errors = tmp_path / "finetune" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from finetune.stages import sft  # planted\n")
    found = layer_problems(tmp_path)
    assert any("finetune.errors imports finetune.stages.sft" in p for p in found), found
    assert any(p.startswith("import circle between units") for p in found), found
    (tmp_path / "finetune" / "newthing.py").write_text('"""A module nobody placed."""\n')
    assert any("`newthing` is not placed" in p for p in layer_problems(tmp_path))


def test_imports_inside_functions_say_why():
    """An import inside a function is kept only for an optional extra or to keep `finetune --help`
    and `validate` fast; each says which in a comment on its line or the line above."""
    silent = []
    for path in sorted((REPO / "finetune").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        here, above = lines[inner.lineno - 1], lines[inner.lineno - 2]
                        if "#" not in here and not above.strip().startswith("#"):
                            silent.append(f"{path.relative_to(REPO)}:{inner.lineno}: {here.strip()}")
    assert silent == [], "move these imports to the top, or say in a comment why they wait: " + "; ".join(silent)
