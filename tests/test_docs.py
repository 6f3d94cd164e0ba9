"""The README and docs/ as a reader meets them: a README short enough to read, opening with the two
commands, and no relative link (or anchor) that leads nowhere, on GitHub or on the docs site.

`mkdocs build --strict` (in .ci/run) checks docs/ on the site; this checks the README too, and
runs with the rest of the suite, without the `docs` extra.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]

DEMO = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[all]" && .venv/bin/tracewire demo'
TESTS = (
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest'
)

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor the docs site gives it (Python-Markdown's toc.slugify)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """Anchors that both GitHub and the docs site give the page's headings."""
    headings = HEADING.findall(FENCE.sub("", page.read_text()))
    return {github_slug(h) for h in headings} & {mkdocs_slug(h) for h in headings}


def relative_links(page: Path) -> list[str]:
    return [
        url
        for url in LINK.findall(prose(page.read_text()))
        if not urlsplit(url).scheme and not url.startswith("mailto:")
    ]


def test_the_readme_fits_on_a_few_screens() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_opens_with_the_demo_and_the_test_command() -> None:
    commands = [line.strip() for line in README.read_text().splitlines() if line.startswith("    ")]
    assert commands[:2] == [DEMO, TESTS]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_its_anchor(page: Path) -> None:
    broken = []
    for url in relative_links(page):
        parts = urlsplit(url)
        target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if not target.exists() or ROOT not in target.parents:
            broken.append(f"{url}: no such file in the repository")
        elif parts.fragment and target.suffix == ".md" and parts.fragment not in anchors(target):
            broken.append(f"{url}: no heading with that anchor in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_links_are_found() -> None:
    """The checks above see the README's links: a parser that found none would pass them all."""
    links = relative_links(README)
    assert "docs/index.md" in links and "docs/serving.md#serving-an-mlflow-model" in links
    assert "serving-an-mlflow-model" in anchors(ROOT / "docs" / "serving.md")


ARCHITECTURE = ROOT / "docs" / "architecture.md"
PROCESSES = {"app", "worker", "shipper", "cli", "tests"}


def module_tree(page: Path) -> dict[str, list[str]]:
    """The module tree on the architecture page: each module's path under src/tracewire/, and
    the processes its line names. A line is a folder (``name/``) or a module (``name.py``, the
    processes, what it holds), indented two spaces a level."""
    (block,) = re.findall(r"^```text\nsrc/tracewire/\n(.*?)^```", page.read_text(), re.M | re.S)
    folders: list[str] = []
    modules: dict[str, list[str]] = {}
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2 - 1
        name, *words = line.split()
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name)
            continue
        modules["".join(folders) + name] = list(
            itertools.takewhile(lambda word: word in PROCESSES, words)
        )
    return modules


def test_the_module_tree_lists_every_module_and_where_it_runs() -> None:
    src = ROOT / "src" / "tracewire"
    tree = module_tree(ARCHITECTURE)
    assert set(tree) == {p.relative_to(src).as_posix() for p in src.rglob("*.py")}
    assert not [path for path, processes in tree.items() if not processes]
    assert "export/encode.py" in tree and tree["export/encode.py"] == ["worker"]
