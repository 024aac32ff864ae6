"""The user's documents stay true to the code: the README's study-file reference is the schema's (every key with
its default and a description), and every relative link in the README and docs/ reaches a file and heading."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from hpsearch.config import StudyConfig

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_study_keys_are_the_schemas() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "study_keys.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout


def test_every_study_file_key_has_a_description() -> None:
    def undocumented(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                missing += undocumented(kind, f"{prefix}{name}.")
            elif not field.description:
                missing.append(f"{prefix}{name}")
        return missing

    tables = {name: field.annotation for name, field in StudyConfig.model_fields.items() if not field.exclude}
    missing = [key for name, model in tables.items() for key in undocumented(model, f"{name}.")]  # type: ignore[arg-type]
    assert not missing, f"keys without a docstring (the README's reference prints it): {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_reach_a_file_and_heading() -> None:
    broken = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists():
                broken.append(f"{document.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"(?m)^#+ (.+)$", linked.read_text(encoding="utf-8"))
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{document.name}: {target} (no such heading)")
    assert not broken, broken
