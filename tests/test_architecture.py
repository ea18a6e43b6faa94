"""The package layering of docs/architecture.md, read from the source's import statements:
dependencies run one way, and torch.distributed is imported in the modules that own it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# package -> the project packages it may import (besides itself)
ALLOWED = {"model": set(), "stats": set(), "trainer": {"model", "stats"},
           "diagnostics": {"model", "trainer", "stats"},
           "experiments": {"trainer", "stats", "diagnostics"}}
DISTRIBUTED_OWNERS = {"trainer/distributed.py",   # process groups and collectives
                      "trainer/checkpoint.py"}    # DCP, the sharded checkpoint format
PROJECT = {"model", "stats", "trainer", "diagnostics", "experiments", "launch", "benchmarks",
           "tests"}


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
             if name.split(".")[0] in PROJECT - ALLOWED[package] - {package}}
    assert not wrong, sorted(wrong)


def test_experiments_use_only_the_offline_analysis_of_diagnostics():
    """Trials run as processes of launch/train.py: the observers are not experiments' to build."""
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in sources("experiments") for name in imported_modules(path)
             if name.split(".")[0] == "diagnostics" and not name.startswith("diagnostics.analysis")}
    assert not wrong, sorted(wrong)


# The command, and a search trial's training process (train.py plus the search's observer).
ENTRY_POINTS_OF_EXPERIMENTS = ("launch/experiment.py", "launch/search_trial.py")


def test_nothing_imports_experiments():
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for package in PROJECT - {"experiments", "tests"} if (REPO / package).is_dir()
             for path in sources(package) for name in imported_modules(path)
             if name.split(".")[0] == "experiments"
             and str(path.relative_to(REPO)) not in ENTRY_POINTS_OF_EXPERIMENTS}
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
             for package in ("model", "trainer", "diagnostics", "launch")
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
