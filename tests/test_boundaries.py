"""The import boundaries of docs/architecture.md, read from the source and checked at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers")

# folder -> modules (and their submodules) nothing in it may import
FORBIDDEN = {
    "client": (*HEAVY, "batchd.daemon", "batchd.scheduler", "batchd.workers"),
    "daemon": (*HEAVY, "batchd.scheduler", "batchd.workers"),
    "scheduler": (*HEAVY, "batchd.workers"),
    "workers": ("batchd.scheduler",),
    "workers/hf": ("batchd.scheduler", "redis"),  # no Redis below the worker shell
    # Backends for other libraries: producers, like any caller of the client.
    "integrations": ("batchd.daemon", "batchd.scheduler", "batchd.workers"),
}
# The worker shell's top level is torch-free by layout: everything that needs torch is under hf/.
TORCH_FREE_TOP_LEVEL = "workers"

PACKAGE_OF = {"client": "batchd.client", "daemon": "batchd.daemon", "scheduler": "batchd.scheduler",
              "workers": "batchd.workers", "workers/hf": "batchd.workers.hf",
              "integrations": "batchd.integrations"}


def imports_of(path: Path, package: str) -> set[str]:
    """Every module a source file imports when it runs (not under `if TYPE_CHECKING:`),
    relative imports resolved against its package."""
    names = set()
    for node in _run_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def _run_time_nodes(tree: ast.AST):
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def offending(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_no_folder_imports_across_its_boundary(folder):
    problems = []
    for path in sorted((REPO / folder).glob("*.py")):
        bad = offending(imports_of(path, PACKAGE_OF[folder]), FORBIDDEN[folder])
        if folder == TORCH_FREE_TOP_LEVEL:
            bad += offending(imports_of(path, PACKAGE_OF[folder]), HEAVY + ("batchd.workers.hf",))
        if bad:
            problems.append(f"{path.relative_to(REPO)}: {bad}")
    assert not problems


def test_the_checker_resolves_relative_imports_and_skips_type_checking_ones(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("from typing import TYPE_CHECKING\nfrom .hf import engine\nimport torch.nn\n"
                      "if TYPE_CHECKING:\n    import transformers\n")
    assert offending(imports_of(source, "batchd.workers"), ("batchd.workers.hf", *HEAVY)) == [
        "batchd.workers.hf", "batchd.workers.hf.engine", "torch.nn"]
    source.write_text("from ..worker import Worker\n")
    assert offending(imports_of(source, "batchd.workers.hf"), ("batchd.workers.worker",)) == [
        "batchd.workers.worker", "batchd.workers.worker.Worker"]


@pytest.mark.parametrize("module, absent", [
    ("batchd.workers.worker", HEAVY + ("batchd.scheduler", "batchd.workers.hf.engine")),
    ("batchd.workers.echo", HEAVY + ("batchd.scheduler",)),
    ("batchd.scheduler.daemon", HEAVY + ("batchd.workers",)),
    ("batchd.daemon.toolkit", HEAVY + ("batchd.scheduler", "batchd.workers")),
    ("batchd.cli", HEAVY + ("batchd.scheduler", "batchd.workers.worker")),
])
def test_importing_a_part_loads_nothing_beyond_its_boundary(module, absent, tmp_path):
    code = (f"import sys, {module}; "
            f"print([m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in {absent!r})])")
    # From outside the checkout: what loads is the installed package.
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
