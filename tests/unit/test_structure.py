"""The tree's shape: no import cycles, no giant modules or classes, a light client path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TSD = Path(__file__).resolve().parents[2] / "tsd"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(TSD.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Every tsd module a module imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tsd":
                found.update(a.name for a in node.names)
            elif node.module.startswith("tsd."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tsd."))
    return found


def test_no_import_cycle_between_tsd_modules_counting_lazy_imports() -> None:
    modules = _modules()
    graph = {name: _imports(tree) & modules.keys() for name, tree in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_every_module_stays_under_800_lines_and_classes_under_400() -> None:
    for name, tree in _modules().items():
        lines = len((TSD / f"{name}.py").read_text().splitlines())
        assert lines <= 800, f"tsd/{name}.py has {lines} lines"
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                assert size <= 400, f"class {name}.{node.name} has {size} lines"


def test_core_modules_import_no_adapter() -> None:
    core = {
        "model", "scheduler", "config", "gpupool", "errors", "codec", "slurmjson", "slurmmap",
        "engine", "eligibility", "jobcontrols", "config_admin", "idle", "metrics",
    }  # fmt: skip
    adapters = {"store", "server", "launch", "scope", "gpu", "daemon", "runner", "gpumonitor",
                "slurm", "slurmcmd", "idlewatch", "metricswriter"}
    modules = _modules()
    for name in core:
        assert not _imports(modules[name]) & adapters, f"tsd/{name}.py imports an adapter"


def test_the_client_path_loads_no_daemon_module() -> None:
    code = (
        "import sys, tsd.cli, tsd.client, tsd.protocol\n"
        "daemon_side = {'tsd.daemon', 'tsd.jobtable', 'tsd.runner', 'tsd.dispatch',"
        " 'tsd.handlers', 'tsd.store', 'tsd.launch', 'tsd.gpumonitor', 'tsd.policy',"
        " 'tsd.slurm', 'tsd.slurmcmd'}\n"
        "print(sorted(daemon_side & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
