"""The package layout: one-way imports between launcher's modules, each strategy's quirks in its module, and the map in
docs/architecture.md kept true."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "launcher"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """launcher module -> the launcher modules it imports anywhere in its body (function-level imports too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_of_the_package_imports_itself_back():
    graph = import_graph()
    # A package's __init__ re-exporting its submodules is not a circle: drop edges from a package to its children.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_deciders_and_the_data_layer_never_import_the_worker_or_the_spawner():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith(("launcher.worker", "launcher.launch", "launcher.commands")) or module in (
            "launcher.cli",
            "launcher",
        ):
            continue  # the command line starts what the deciders decided
        bad = {d for d in deps if d.startswith(("launcher.worker", "launcher.launch"))}
        assert not bad, f"{module} imports {bad}"


# Identifiers that belong to one strategy: its module alone may use them (names in code, not words in comments).
QUIRKS = {
    "launcher/worker/strategies/fsdp.py": {"DTensor", "_local_tensor", "full_tensor", "fully_shard"},
    "launcher/worker/strategies/zero.py": {"ds_numel", "GatheredParameters", "deepspeed"},
}


def _identifiers(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.name.split(".")[0] for a in node.names} | {(getattr(node, "module", "") or "").split(".")[0]}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)  # getattr(p, "ds_numel")
    return names


def test_each_strategys_quirks_stay_inside_its_module():
    owners = {name: owner for owner, names in QUIRKS.items() for name in names}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("launcher/worker/strategies/zero_config"):
            continue  # DeepSpeed's JSON, built without importing deepspeed
        leaked = {n for n in _identifiers(path) & set(owners) if owners[n] != rel}
        # DeepSpeed's CPU Adam is an optimizer, its `deepspeed` runner a multi-node launcher (launch/ starts it), and
        # how it is imported (its autotuner deferred) a matter of the process environment.
        others = rel.endswith(("worker/optim.py", "launcher/environment.py")) or rel.startswith("launcher/launch/")
        leaked -= {"deepspeed"} if others else set()
        assert not leaked, f"{rel} uses {sorted(leaked)}, which belong to {sorted({owners[n] for n in leaked})}"


def test_no_history_in_the_code_no_issue_numbers_in_names_or_text():
    """A name says what a thing is: no module or benchmark named after an issue, no "issue N" in code or docs (the
    issue tracker holds the history), and no shim for an old import path (nothing has been released)."""
    import re

    numbered = re.compile("issue" + r"s?[ _-]?\d+", re.IGNORECASE)
    found = []
    for folder in ("launcher", "benchmarks", "scripts", "recipes", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".md", ".sh") or "__pycache__" in path.parts:
                continue
            if numbered.search(path.name):
                found.append(str(path.relative_to(ROOT)))
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in numbered.finditer(path.read_text())]
    assert found == [], found
    assert not (ROOT / "launcher" / "_moved.py").exists()


def test_the_architecture_map_fits_a_screen_names_every_folder_and_only_files_that_exist():
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    assert len(text.splitlines()) <= 60
    folders = {p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")} - {"."}
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*)/`", text))
    assert folders <= named, folders - named
    for path in re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)", text):
        assert (PACKAGE / path).exists() or (ROOT / path).exists(), path


def test_no_module_of_the_package_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by concern: {long}"
