"""The documentation stays short where it must and points only at files that exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_the_readme_is_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_and_heading(page: Path) -> None:
    missing = []
    for match in LINK.finditer(page.read_text()):
        link = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", link):  # a URL
            continue
        target, _, anchor = link.partition("#")
        path = page.parent / target if target else page
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            missing.append(link)
    assert missing == []


def test_the_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in readme] == []


def test_the_configuration_page_names_every_setting() -> None:
    settings = tomllib.loads((REPO / "tailor.toml").read_text())["gateway"]
    page = (REPO / "docs" / "configuration.md").read_text()
    assert [name for name in settings if f"`{name}`" not in page] == []


def test_the_readme_stub_is_the_tested_one() -> None:
    stub = (REPO / "client_js" / "src" / "stub.js").read_text().strip()
    assert stub in (REPO / "README.md").read_text()
