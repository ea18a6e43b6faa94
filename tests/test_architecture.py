"""The package layering of docs/architecture.md, read from the source's import statements:
dependencies run one way, and torch.distributed is imported in the modules that own it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# package -> the project packages it may import (besides itself), from the bottom up
ALLOWED = {"model": set(), "stats": set(), "series": {"model"},
           "scoring": {"model", "stats"},
           "trainer": {"model", "stats", "series", "scoring"},
           "forecasting": {"model", "stats", "series", "scoring", "trainer"},
           "diagnostics": {"model", "trainer", "stats"},
           "experiments": {"trainer", "stats", "diagnostics"}}
# The error vocabulary every command shares (UserError, WriteFailed, their exit statuses):
# any package may import it, and it imports only the standard library.
SHARED_ERRORS = "trainer.errors"
DISTRIBUTED_OWNERS = {"trainer/distributed.py",            # process groups and collectives
                      "trainer/checkpoint/manager.py",     # DCP saves and loads
                      "trainer/checkpoint/safe_load.py",   # DCP's metadata and reader, checked
                      "trainer/checkpoint/state.py"}       # the Stateful parts DCP saves
PROJECT = {"model", "stats", "series", "scoring", "trainer", "forecasting", "diagnostics",
           "experiments", "launch", "benchmarks", "tests"}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, lazy and type-only imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_depend_one_way(package):
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in sources(package) for name in imported_modules(path)
             if name.split(".")[0] in PROJECT - ALLOWED[package] - {package}
             and name != SHARED_ERRORS}
    assert not wrong, sorted(wrong)


def test_allowed_directions_have_no_circle():
    """No package may import one that may, directly or not, import it."""
    def below(package: str) -> set[str]:
        return set().union(*({p} | below(p) for p in ALLOWED[package]))
    assert not [p for p in ALLOWED if p in below(p)]


def test_the_shared_errors_import_only_the_standard_library():
    path = REPO / (SHARED_ERRORS.replace(".", "/") + ".py")
    assert {name.split(".")[0] for name in imported_modules(path)} <= sys.stdlib_module_names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from a import b` names a.b when b is
    a module), lazy and type-only imports included."""
    paths = {module_name(path): path for package in ALLOWED for path in sources(package)}
    graph = {}
    for name, path in paths.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                named |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
        graph[name] = (named & paths.keys()) - {name}
    return graph


def test_no_module_imports_itself_through_others():
    graph, circles = import_graph(), []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, circles


def test_experiments_use_only_the_offline_analysis_of_diagnostics():
    """Trials run as processes of launch/train.py: the observers are not experiments' to build."""
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in sources("experiments") for name in imported_modules(path)
             if name.split(".")[0] == "diagnostics" and not name.startswith("diagnostics.analysis")}
    assert not wrong, sorted(wrong)


# Packages behind a command: only their entry points import them. experiments: the command,
# and a search trial's training process (train.py plus the search's observer).
ENTRY_POINTS = {"experiments": ("launch/experiment.py", "launch/search_trial.py"),
                "forecasting": ("launch/forecast.py", "launch/evaluate.py")}


@pytest.mark.parametrize("command_package", sorted(ENTRY_POINTS))
def test_nothing_imports_a_command_package_but_its_entry_points(command_package):
    """Nothing but its entry points, the tests and the benchmarks (which drive it as a user
    would)."""
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for package in PROJECT - {command_package, "tests", "benchmarks"}
             if (REPO / package).is_dir()
             for path in sources(package) for name in imported_modules(path)
             if name.split(".")[0] == command_package
             and str(path.relative_to(REPO)) not in ENTRY_POINTS[command_package]}
    assert not wrong, sorted(wrong)


def test_the_offline_analysis_imports_only_itself_the_record_schemas_and_stats():
    """It reads files: neither the trainer nor the observers (nor torch) are below it."""
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in sources("diagnostics/analysis") for name in imported_modules(path)
             if name.split(".")[0] in PROJECT | {"torch"}
             and not name.startswith(("diagnostics.analysis", "diagnostics.schemas", "stats"))
             and name != "diagnostics"}
    assert not wrong, sorted(wrong)


def test_stats_needs_only_numpy_and_scipy():
    """The verdict reads it without torch: the shared statistics stand on numpy and scipy."""
    allowed = sys.stdlib_module_names | {"numpy", "scipy", "stats"}
    third_party = {f"{path.relative_to(REPO)} imports {name}"
                   for path in sources("stats") for name in imported_modules(path)
                   if name.split(".")[0] not in allowed}
    assert not third_party, sorted(third_party)


def test_torch_distributed_is_imported_only_where_it_is_owned():
    users = {str(path.relative_to(REPO))
             for package in (*ALLOWED, "launch")
             for path in sources(package)
             if any(name.startswith("torch.distributed") for name in imported_modules(path))}
    assert users == DISTRIBUTED_OWNERS


@pytest.mark.slow
def test_the_offline_analysis_loads_without_torch():
    code = ("import sys, diagnostics.analysis.cli; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'model', 'trainer')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


LONGEST_FUNCTION = 60      # lines, ../shared/STYLE.md's anchor


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
            f"({node.end_lineno - node.lineno + 1} lines)"
            for package in sorted(PROJECT) for path in sources(package)
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, long
