"""The layout table of docs/development.md, generated from the code: every package and module of src/hpsearch
with its one job.

A module's job is the first sentence of its docstring (a package's, of its `__init__`); the rows follow the layers
of pyproject's import-linter contract, top to bottom, so the table and the checked rules cannot disagree.

    python tools/layout.py            # print the table
    python tools/layout.py --write    # put it in docs/development.md, between the layout markers
    python tools/layout.py --check    # exit 1 when the table there is not the code's (tests/test_layout.py)

It reads the files (ast), imports nothing of hpsearch: it runs without the project's dependencies.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import _generated

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "hpsearch"
DOC = ROOT / "docs" / "development.md"

# The first sentence ends at a period followed by whitespace and a capital or a code span ("... of Optuna. Knows
# nothing ..."); periods inside names (hpsearch.store, e.g.) have no whitespace after them.
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z`])")


def layers(pyproject: Path = ROOT / "pyproject.toml") -> list[list[str]]:
    """The layers contract's layers, top to bottom, each a list of the names directly under hpsearch."""
    config = tomllib.loads(pyproject.read_text())
    for contract in config["tool"]["importlinter"]["contracts"]:
        if contract["type"] == "layers" and contract.get("containers") == ["hpsearch"]:
            return [[name.strip() for name in re.split(r"[|:]", layer)] for layer in contract["layers"]]
    raise SystemExit("pyproject.toml: no import-linter layers contract with containers = ['hpsearch']")


def job(path: Path) -> str:
    """A module's one job: its docstring's first sentence, on one line."""
    docstring = ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
    if not docstring:
        raise SystemExit(f"{path.relative_to(ROOT)}: no module docstring; its first sentence is the module's job")
    summary = " ".join(docstring.split("\n\n", 1)[0].split())
    return _SENTENCE_END.split(summary, 1)[0].replace("|", "\\|")


def _files_of(name: str) -> list[Path]:
    """The files of a name under hpsearch: a module, or a package's `__init__` then every module under it."""
    module = PACKAGE / f"{name}.py"
    if module.is_file():
        return [module]
    package = PACKAGE / name
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"pyproject.toml: layer {name!r} is neither src/hpsearch/{name}.py nor a package")
    # Folder by folder; in each, the package's own row (its __init__) first.
    return sorted(package.rglob("*.py"), key=lambda p: (p.parent.parts, p.name != "__init__.py", p.name))


def table() -> str:
    """The Markdown table: layer (1 is the bottom), package or module, its job."""
    ordered = layers()
    rows = [("", PACKAGE / "__init__.py")]
    for depth, layer in enumerate(ordered):
        rows += [(str(len(ordered) - depth), path) for name in layer for path in _files_of(name)]
    unlisted = set(PACKAGE.rglob("*.py")) - {path for _, path in rows}
    if unlisted:  # lint-imports' exhaustive layers contract fails on these too; name them here as well
        names = ", ".join(sorted(path.relative_to(PACKAGE).as_posix() for path in unlisted))
        raise SystemExit(f"src/hpsearch: in no layer of pyproject's contract: {names}")
    lines = ["| layer | package or module | its one job |", "|---|---|---|"]
    lines += [f"| {number} | {_shown(path)} | {job(path)} |" for number, path in rows]
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if path.name == "__init__.py":
        return "`__init__.py`" if relative.parent == Path() else f"`{relative.parent.as_posix()}/`"
    return f"`{relative.as_posix()}`"


def main(argv: list[str] | None = None) -> int:
    return _generated.main(argv, description=__doc__.splitlines()[0], name="layout", tool="layout.py", path=DOC,
                           render=table)


if __name__ == "__main__":
    sys.exit(main())
