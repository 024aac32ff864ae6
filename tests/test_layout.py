"""The layout's rules that import-linter does not check: no import circle between two modules, small modules, and
the README's layout table generated from the code (tools/layout.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 450
# The repository's own code: the package, its tests, tools and benchmarks (not .venv, .git, build outputs).
OWN_CODE = ("src", "tests", "tools", "bench")


def test_no_import_circle() -> None:
    # Module by module, not squashed into packages: import-linter's acyclic_siblings contract finds circles between
    # the children of a package, but not one through a package's own __init__ (store._x importing `hpsearch.store`,
    # or a module importing `hpsearch` while hpsearch/__init__ reaches it). Imports inside functions count: they
    # close a circle as surely, only later. Imports for type hints never run, so they do not.
    graph = grimp.build_graph("hpsearch", exclude_type_checking_imports=True, cache_dir=None)
    circles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                back = graph.find_shortest_chain(importer=imported, imported=module)
                circles.append(" -> ".join([module, *back]))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_module_over_450_lines() -> None:
    long = {path.relative_to(ROOT).as_posix(): n for top in OWN_CODE for path in sorted((ROOT / top).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_readme_layout_table_is_the_codes() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "layout.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
