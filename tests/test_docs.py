"""README.md, docs/*.md, experiments/*.md and experiments/results/**/*.md: every relative link points
at a file that exists, and every anchor at a heading of that file (GitHub's anchor rule: lower case,
punctuation dropped, spaces to -)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "experiments").glob("*.md")),
    *sorted((ROOT / "experiments" / "results").rglob("*.md")),  # the evidence pages
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![image](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    text = FENCE.sub("", markdown.read_text())
    slugs: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in slugs:  # repeated headings get -1, -2, ...
            slug, n = f"{base}-{n}", n + 1
        slugs.add(slug)
    return slugs


def relative_links(markdown: Path) -> list[str]:
    text = FENCE.sub("", markdown.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_documents_exist():
    names = {p.name for p in DOCUMENTS}
    for name in ("data.md", "training.md", "tuning.md", "cluster.md", "deployment.md", "speed.md"):
        assert name in names, f"docs/{name} is missing"


def test_every_page_under_experiments_is_checked():
    pages = set((ROOT / "experiments").rglob("*.md"))
    assert pages <= set(DOCUMENTS), sorted(str(p.relative_to(ROOT)) for p in pages - set(DOCUMENTS))


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it to 250"


@pytest.mark.parametrize("markdown", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(markdown):
    broken = []
    for target in relative_links(markdown):
        path, _, anchor = target.partition("#")
        file = (markdown.parent / path).resolve() if path else markdown
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{markdown.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A title\n\n[ok](#a-title) [gone](missing.md) [bad](#nope) [web](https://x.y)\n"
    )
    assert relative_links(page) == ["#a-title", "missing.md", "#nope"]
    assert anchors(page) == {"a-title"}
