"""The package's layout: no import cycle, and the table, figure and search-bookkeeping modules import
without torch (their jobs stay light)."""

import ast
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "tlselect"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports() -> dict[str, set[str]]:
    """``{module: the tlselect modules it imports at import time}`` (imports inside functions left out)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlselect"):
                for alias in node.names:  # `from tlselect.search import brackets` imports a module
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("tlselect")}
        graph[name] = targets & set(modules)
    return graph


def test_the_package_has_no_import_cycle():
    graph, done, path = top_level_imports(), set(), []

    def visit(module):
        assert module not in path, "import cycle: " + " -> ".join([*path[path.index(module) :], module])
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert "tlselect.training.trainer" in graph and graph["tlselect.training.trainer"]  # the scan sees imports


def test_table_figure_and_search_bookkeeping_modules_import_without_torch(tmp_path):
    for name in ("torch", "torchvision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    light = ["tlselect.config", "tlselect.runs", "tlselect.report.tables", "tlselect.report.plots",
             "tlselect.search.brackets", "tlselect.search.compare", "tlselect.search.replay",
             "tlselect.search.strategies", "tlselect.search.jobs", "tlselect.core.registry",
             "tlselect.training.forkserver", "tlselect.search.tenants", "tlselect.search.tenancy",
             "tlselect.search.tenant_jobs", "tlselect.report.tenant_plots"]  # fmt: skip
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); sys.path.insert(1, {str(REPO)!r}); "
    code += "; ".join(f"import {m}" for m in light)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the same check fails when a module does import torch
    heavy = subprocess.run([sys.executable, "-c", code + "; import tlselect.training.models"], capture_output=True)
    assert heavy.returncode != 0
