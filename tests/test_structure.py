"""The package's shape: imports flow one way, functions and files stay small.

Read from the source with ``ast`` (nothing is imported), so a cycle hidden by
an import inside a function is found as well as one at the top of a file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "toy", "experiments")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            prefix = ".".join(parts[:i])
            if prefix in modules:
                found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _imported(node, modules)
        # a package's own __init__ is loaded before its modules: not an edge worth reporting
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "study.evaluation.setup" in graph and graph["study.train.loop"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The package's folders, lowest first: a module imports only from its own folder and those before it.
LAYERS = ("utils", "config", "data", "losses", "models", "methods", "train", "evaluation", "studies", "figures",
          "cli", "__main__")


def _layer(module: str) -> int:
    parts = module.split(".")
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])


def test_every_module_of_the_package_sits_in_a_known_folder():
    unknown = [m for m in _modules() if m.startswith("study.") and m.split(".")[1] not in LAYERS]
    assert unknown == [], f"modules outside the layers {LAYERS}: add the folder to LAYERS in its place"


def test_imports_flow_from_each_folder_only_to_those_below_it():
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("study.")
                    for d in deps if d.startswith("study.") and _layer(d) > _layer(m))
    assert upward == []


def test_the_folder_order_check_finds_an_upward_import():
    assert _layer("study.models.decoder") < _layer("study.methods.model") < _layer("study.train.loop")
    assert _layer("study.config") < _layer("study.data.masking")


def test_evaluation_never_imports_figures():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("study.figures"))
                 for m, deps in graph.items() if m.startswith("study.evaluation")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_package_never_imports_the_experiments():
    """Imports flow one way: experiments (the benchmark, the scripts) use study, never the reverse."""
    graph = import_graph()
    assert "experiments.bench.run" in graph, "the experiments were not read"
    offenders = {m: sorted(d for d in deps if d.startswith("experiments"))
                 for m, deps in graph.items() if m.startswith(("study", "toy"))}
    assert not {m: d for m, d in offenders.items() if d}


def _long_functions() -> list[str]:
    out = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {lines} lines")
    return out


@pytest.mark.parametrize("check", ["functions", "files"])
def test_small_functions_and_files(check):
    if check == "functions":
        assert _long_functions() == [], f"functions over {MAX_FUNCTION_LINES} lines"
    else:
        long_files = [f"{name}: {n} lines" for name, path in _modules().items()
                      if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES]
        assert long_files == [], f"files over {MAX_FILE_LINES} lines"


# Module docstrings say what a module is for and why, in a few lines; the layout lives in the README.
MAX_MODULE_DOCSTRING_LINES = 15
DOCSTRING_FOLDERS = ("study", "toy", "experiments", "notebooks")
# Code says what it does, not the history of how it came to be: no tracker numbers, no files outside the repo.
# (spelled so that a grep for these finds nothing here either)
HISTORY = re.compile(r"\bissue \d+|DESIGN\.md|papers[/]")


def _python_files(folders: tuple[str, ...]) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))
            if "__pycache__" not in path.parts]


def test_module_docstrings_are_short():
    files = _python_files(DOCSTRING_FOLDERS)
    assert any(p.relative_to(ROOT).parts[0] == "study" for p in files), "the package was not read"
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in files
            if (n := len((ast.get_docstring(ast.parse(path.read_text()), clean=False) or "").splitlines()))
            > MAX_MODULE_DOCSTRING_LINES]
    assert long == [], f"module docstrings over {MAX_MODULE_DOCSTRING_LINES} lines"


def test_no_history_references_in_code():
    this = Path(__file__).resolve()
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in _python_files(DOCSTRING_FOLDERS) if path.resolve() != this
             for n, line in enumerate(path.read_text().splitlines(), start=1) if HISTORY.search(line)]
    assert found == [], "issue numbers or files outside the repository named in code"


def test_the_history_check_finds_what_it_looks_for():
    for text in ("fixed in issue " + "43", "see DESIGN" + ".md", "papers" + "/x.txt"):
        assert HISTORY.search(text), text
    assert not HISTORY.search("reissue" + " 4 of a table") and not HISTORY.search("a known issue")
