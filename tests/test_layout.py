"""The repository's shape: the scripts a user runs at the top, the library in maskcls/, no import cycle, and no
script imported as a library (train.py may call demo_data for the demo)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "maskcls"
SCRIPTS = {"train", "inference", "evaluation", "dataset", "model", "loss", "predict", "export", "calibrate", "audit",
           "holdout", "demo_data", "bench", "serving"}
SHARED = {"dataset", "model", "loss"}  # the scripts' shared modules, as the user asked: anyone may import them
ALLOWED = {("train", "demo_data")}  # train.py generates the demo data when no --data_dir is given


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for the top level and the package."""
    found = {p.stem: p for p in root.glob("*.py")}
    found.update({f"{PACKAGE}.{p.stem}": p for p in (root / PACKAGE).glob("*.py") if p.stem != "__init__"})
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {name for name in names if name in known}
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports(path, set(modules)) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_top_level_holds_the_scripts_and_the_library_is_one_package():
    assert {p.stem for p in ROOT.glob("*.py")} == SCRIPTS
    assert (ROOT / PACKAGE / "__init__.py").is_file()
    assert not [p for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and p.name != "__pycache__"]  # one flat package


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"inference": {"serving"}, "serving": {"inference"}, "x": set()}) == [["inference", "serving"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "task.py").write_text("def criterion():\n    from loss import make\n    return make()\n")
    (tmp_path / "loss.py").write_text("from maskcls.task import Task\n")
    graph = import_graph(tmp_path)
    assert graph == {"loss": {"maskcls.task"}, "maskcls.task": {"loss"}}
    assert cycles(graph) == [["loss", "maskcls.task"]]


def test_no_script_is_imported_as_a_library():
    graph = import_graph()
    known = set(project_modules())
    graph.update({f"recipes/{p.name}": imports(p, known) for p in (ROOT / "recipes").glob("*.py")})
    misuse = sorted((user, used) for user, deps in graph.items() for used in deps
                    if used in SCRIPTS - SHARED and (user, used) not in ALLOWED)
    assert misuse == []


@pytest.mark.parametrize("name", sorted(SHARED))
def test_the_shared_modules_import_no_upper_layer_of_the_package(name):
    """dataset.py, model.py and loss.py sit between the package's lower layer (which they use) and its
    upper one (predictor, pyfunc, config, checkpoint: which use them)."""
    graph = import_graph()
    upper = {m for m, deps in graph.items() if m.startswith(PACKAGE + ".") and deps & SHARED}
    assert not graph[name] & upper, f"{name} imports {sorted(graph[name] & upper)}, which import the shared modules"
