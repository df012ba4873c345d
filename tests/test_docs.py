"""README.md and docs/ stay true: every relative link resolves, every `python -m` module runs as a program,
and .ci/run runs exactly the README's test command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def test_readme_fits_on_a_screen_or_two_and_docs_hold_the_rest():
    assert len((REPO / "README.md").read_bytes()) < 12_000
    assert len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_dash_m_module_exists_and_runs_as_a_program(page: Path):
    missing = []
    for name in sorted(set(MODULE.findall(page.read_text()))):
        spec = importlib.util.find_spec(name)
        if spec is None:
            missing.append(f"{name}: not importable")
        elif name.startswith("crystal"):
            runnable = (
                importlib.util.find_spec(f"{name}.__main__") is not None
                if spec.submodule_search_locations
                else "__main__" in Path(spec.origin).read_text()
            )
            if not runnable:
                missing.append(f"{name}: has no __main__")
    assert not missing, f"{page.relative_to(REPO)}: {missing}"


def test_ci_runs_exactly_the_readmes_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (test_command,) = [b.strip() for b in blocks if b.strip().endswith("pytest tests/")]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command.replace("python3 -m venv .venv && . .venv/bin/activate && ", "") in ci
    assert "set -e" in ci
