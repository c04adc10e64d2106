"""The manual holds together: a short front page, links and anchors that resolve, every option documented.

The README is the front page (at most 300 lines); everything else is in docs/. A link between the pages, or
to a heading in one, that goes nowhere fails here, as does a gate metric, a distillation method or a
deployment variant that its page does not name.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from kdpipe import config

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to dashes, -1 for a repeat)."""
    found: set[str] = set()
    for line in _prose(path):
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n, unique = 0, slug
            while unique in found:
                n += 1
                unique = f"{slug}-{n}"
            found.add(unique)
    return found


def test_readme_is_a_front_page() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into a page in docs/"
    text = "\n".join(lines)
    for command in ("make demo", "make test"):
        assert command in text
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in text, f"the README's manual section does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for line in _prose(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize(
    "names, page",
    [
        (typing.get_args(config.GateMetric), "gates-and-reports.md"),
        (typing.get_args(config.DistillMethod), "methods.md"),
        (typing.get_args(config.Variant), "quantization.md"),
    ],
    ids=["gate metrics", "distillation methods", "variants"],
)
def test_every_choice_is_documented_on_its_page(names: tuple[str, ...], page: str) -> None:
    text = (DOCS / page).read_text()
    missing = [name for name in names if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"docs/{page} does not document {missing}"
