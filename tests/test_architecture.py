"""The shape of the package, read from its source with `ast` (the house style's rules 4 and 7):

- the import graph of `anita` has no cycles (counting the names a package exports lazily);
- only `anita/cli.py` imports a `cli.py` module;
- imports inside functions are kept for optional dependencies, so none hides an edge of the graph.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "anita"
# Imported where used: a missing native library is not an import error (bitsandbytes); lm-eval is the
# `eval` extra, whose task machinery (datasets and all) loads only when harness tasks run.
OPTIONAL_DEPENDENCIES = {"bitsandbytes", "lm_eval", "trackio"}
# optional modules inside required packages: torch's TensorBoard writer needs the `tensorboard` package
OPTIONAL_MODULES = {"torch.utils.tensorboard"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(node: ast.ImportFrom | ast.Import, importer: str) -> list[str]:
    """The anita modules an import statement loads (a name imported from a package that is itself a
    submodule counts as that submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:  # relative import
        base = importer if is_package(importer) else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    if source not in MODULES:
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]


def lazy_exports(tree: ast.Module) -> list[str]:
    """The modules a package's `LAZY_EXPORTS = {name: module}` table names (PEP 562 `__getattr__`)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAZY_EXPORTS" for t in node.targets):
            return [v.value for v in node.value.values if isinstance(v, ast.Constant)]
    return []


def function_level_imports(tree: ast.Module):
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def import_graph() -> dict[str, set[str]]:
    """module -> the anita modules it imports (its own parent packages left out: Python initialises
    them first, so they are never a cycle)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set(lazy_exports(tree))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(resolve(node, name))
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    """The checks below read every module: the known layers are all there, with their edges."""
    graph = import_graph()
    assert {"anita.cli", "anita.model.llama", "anita.quant.nf4", "anita.dpo.loss", "anita.train.loop"} <= set(graph)
    assert "anita.model.llama" in graph["anita.model.checkpoint"]
    assert "anita.dpo.run" in graph["anita.dpo"]  # a lazy export is an edge too


def test_import_graph_has_no_cycles():
    assert find_cycle(import_graph()) is None


def test_find_cycle_finds_one():
    """The checker itself: a planted a -> b -> c -> a is reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_command_line_imports_cli_modules():
    offenders = [(name, target) for name, targets in import_graph().items() for target in targets
                 if target.rpartition(".")[2] == "cli" and name != "anita.cli"]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_function_level_imports_are_for_optional_dependencies_only(name):
    tree = ast.parse(MODULES[name].read_text())
    for node in function_level_imports(tree):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for module in modules:
            optional = module.split(".")[0] in OPTIONAL_DEPENDENCIES or module in OPTIONAL_MODULES
            assert optional, f"{name}:{node.lineno} imports {module} in a function"


def test_the_loss_imports_alone():
    """`from anita.dpo import dpo_loss, orpo_loss, simpo_loss, kto_loss` loads the pure losses, not the training stack."""
    code = ("import json, sys; from anita.dpo import dpo_loss, orpo_loss, simpo_loss, kto_loss; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('anita'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == ["anita", "anita.dpo", "anita.dpo.beyond_dpo", "anita.dpo.loss", "anita.dtypes",
                                      "anita.errors"]


def test_the_readme_file_map_lists_every_module_and_nothing_stale():
    """The house rule: one line per file in README.md's file map, kept current."""
    readme = (ROOT.parent / "README.md").read_text()
    modules = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py") if p.name != "__init__.py"]
    assert [m for m in sorted(modules) if f"`{m}`" not in readme] == []
    listed = {m.group(1) for m in re.finditer(r"`(anita/[\w/]+\.py)`", readme)}
    assert [f for f in sorted(listed) if not (ROOT.parent / f).exists()] == []


# The packages in layers, lowest first: each imports only from layers below it (and the shared
# top-level modules), so `anita.model` never reaches up into LoRA, nor LoRA into training.
LAYERS = {"quant": 0, "model": 1, "lora": 2, "train": 3, "eval": 3, "export": 3, "dpo": 4}


def _package(module: str) -> str | None:
    return module.split(".")[1] if module.count(".") else None


def test_no_package_imports_a_layer_above_it():
    upward = sorted((a, b) for a, targets in import_graph().items() for b in targets
                    if _package(a) in LAYERS and _package(b) in LAYERS
                    and _package(a) != _package(b) and LAYERS[_package(b)] >= LAYERS[_package(a)])
    assert upward == []
