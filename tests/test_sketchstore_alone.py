"""sketchstore passes its tests with cropi absent: the store's test files import nothing of cropi (nor
of the ``cropi`` command), take their model and data fixtures from sketchstore_fixtures.py, and a
quick subset of them passes in a subprocess where importing cropi raises ImportError.

The subprocess runs QUICK_SUBSET, not every store test: the whole set takes minutes (builds, fault
injection, S3, concurrent writers). The subset builds a store from the fixture model and data (exact
norms checked), then scores, selects, verifies and repairs (~30 s on 2 cores; a second build test
would add ~17 s); the static checks cover every file in STORE_TESTS."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The store's test files: they test sketchstore and its `sketch` command (cli/sketch.py imports only sketchstore).
STORE_TESTS = ("test_store.py", "test_build.py", "test_factored.py", "test_faults.py", "test_verify.py",
               "test_scoring_selection.py", "test_projection.py", "test_properties.py", "test_distributed.py",
               "test_object_store.py", "test_cli.py", "test_layout.py", "test_sketchstore_alone.py")
QUICK_SUBSET = ("test_build.py::test_build_stores_every_row_with_exact_norms", "test_scoring_selection.py",
                "test_verify.py")
BLOCKED = ("cropi", "cli.cropi")
SHARED_FIXTURES = ("tiny_model", "other_tiny_model", "sft_data")  # conftest.py gives cropi's under these names
FIXTURES_MODULE = "sketchstore_fixtures"
SUBSET_TIMEOUT_S = 900
# Put on PYTHONPATH as sitecustomize.py: every Python process started under it (pytest, the `sketch`
# command, multiprocessing children) fails to import the blocked modules.
BLOCKER = f'''
import importlib.abc
import sys

BLOCKED = {BLOCKED!r}


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"{{name}} is blocked: the sketchstore tests must run without it", name=name)
        return None


sys.meta_path.insert(0, Absent())
'''


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its body (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_blocked(path: Path, seen: set[Path] | None = None) -> list[str]:
    """The blocked modules ``path`` imports, directly or through the test helpers it imports."""
    seen = set() if seen is None else seen
    seen.add(path)
    found = []
    for name in sorted(imported_modules(path)):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            found.append(name)
        helper = TESTS / f"{name.split('.')[0]}.py"
        if helper.is_file() and helper not in seen:
            found.extend(f"{name} -> {inner}" for inner in imports_blocked(helper, seen))
    return found


def requested_fixtures(path: Path) -> set[str]:
    """Shared fixture names that functions of ``path`` take as arguments."""
    return {arg.arg for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for arg in node.args.args if arg.arg in SHARED_FIXTURES}


def fixtures_imported(path: Path) -> set[str]:
    return {alias.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.ImportFrom) and node.module == FIXTURES_MODULE for alias in node.names}


def test_store_tests_import_no_cropi():
    leaks = {name: imports_blocked(TESTS / name) for name in STORE_TESTS + (f"{FIXTURES_MODULE}.py",)}
    assert not any(leaks.values()), leaks


def test_store_tests_take_their_own_fixtures():
    borrowed = {name: sorted(requested_fixtures(TESTS / name) - fixtures_imported(TESTS / name))
                for name in STORE_TESTS}
    assert not any(borrowed.values()), f"import these from {FIXTURES_MODULE} (conftest's are cropi's): {borrowed}"


def blocked_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    return env


def test_the_blocker_blocks_cropi_and_keeps_the_store(tmp_path):
    env = blocked_env(tmp_path)
    for module in BLOCKED:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and f"{module} is blocked" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import sketchstore, cli.sketch"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_quick_subset_passes_without_cropi(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(str(TESTS / name) for name in QUICK_SUBSET)],
                          cwd=REPO, env=blocked_env(tmp_path), capture_output=True, text=True,
                          timeout=SUBSET_TIMEOUT_S)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), summary  # nothing skipped or failed
