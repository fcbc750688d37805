"""The architecture stays as the README's code map says: imports flow one way, the artifact names
live in one module, lint and types are clean, and the wheel installs every sub-package."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from asyncfgd.runtime import contract

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"exporter": "asyncfgd.exporter", "runtime": "asyncfgd.runtime", "app": "asyncfgd.app"}
#: runtime modules that may import torch (each lazily, when used): the torch backend, its op set and the
#: torch.distributed path of data-parallel training
RUNTIME_TORCH = {"asyncfgd.runtime.torch_backend", "asyncfgd.runtime.dual.torch_ops", "asyncfgd.runtime.distributed"}
#: files that define a vocabulary of their own whose words coincide with graph roles: training
#: methods ("local") and bench methods ("forward")
OTHER_VOCABULARIES = {"runtime/engine.py": {contract.LOCAL}, "app/bench/worker.py": {contract.FORWARD},
                      "app/bench/run.py": {contract.FORWARD}, "app/bench/memory_model.py": {contract.FORWARD}}


def _modules() -> dict[str, Path]:
    """Every project module by its installed name."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports, at module level or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_project_modules():
    graph = _graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 100  # the scan sees the real tree
    assert _cycles(graph) == []


def test_runtime_never_imports_the_exporter_or_the_app():
    bad = {(m, t) for m, ts in _graph().items() if m.startswith("asyncfgd.runtime")
           for t in ts if t.startswith(("asyncfgd.exporter", "asyncfgd.app"))}
    assert bad == set()


def test_runtime_imports_torch_only_in_the_torch_backends():
    users = set()
    for name, path in _modules().items():
        if not name.startswith("asyncfgd.runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "torch" or n.startswith("torch.") for n in names):
                users.add(name)
    assert users == RUNTIME_TORCH


def _literal_offences(source: str, label: str, allowed: set[str]) -> list[str]:
    roles = {*contract.ROLES, contract.LOCAL}
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        v = node.value
        if (v in roles and v not in allowed) or v.startswith(contract.PREFIXES):
            out.append(f"{label}:{node.lineno}: {v!r}")
    return out


def test_role_names_and_prefixes_are_written_only_in_the_contract():
    offences = []
    for folder in (*PACKAGES, "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel != "runtime/contract.py":
                offences += _literal_offences(path.read_text(), rel, OTHER_VOCABULARIES.get(rel, set()))
    assert offences == []


def test_the_literal_scan_catches_a_planted_role_and_prefix():
    source = 'role = "dual_first"\nname = "w." + x\nstat = f"s_new.{x}"\nok = "dual first"\nmethod = "local"\n'
    assert _literal_offences(source, "p.py", {contract.LOCAL}) == ["p.py:1: 'dual_first'", "p.py:2: 'w.'",
                                                                     "p.py:3: 's_new.'"]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_lint_and_types_are_clean(tool: str):
    cmd = {"ruff": [sys.executable, "-m", "ruff", "check", "."],
           "mypy": [sys.executable, "-m", "mypy", "exporter", "runtime"]}[tool]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_wheel_installs_every_package_and_trains(tmp_path: Path):
    """A built (not editable) wheel in a fresh venv runs `asyncfgd-app train --epochs 1`: a package
    missing from pyproject's explicit list fails here."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ next to the sources it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs",
                                                                 ".venv*", "__pycache__", "artifacts"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("asyncfgd-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "ASYNCFGD_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(py), "-c", "import asyncfgd.app.cli as m; print(m.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert str(env_dir) in where.stdout  # the wheel's copy, not the editable checkout
    proc = subprocess.run([str(env_dir / "bin" / "asyncfgd-app"), "train", "--epochs", "1", "--run-dir", "run"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("test accuracy: ")
