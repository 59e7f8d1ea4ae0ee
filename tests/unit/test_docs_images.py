"""The pictures of the README and docs: every file a page links (pictures shown or linked, other
pages) exists, each picture in docs/images/ is under 300 KB and used somewhere. The pictures themselves are made by the browser tests
(`make docs-images`, tests/browser/conftest.py ComfyPage.doc_shot)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "docs" / "images"
LIMIT = 300 * 1024  # tests/browser/conftest.py DOCS_IMAGE_LIMIT
# Markdown links and images [text](target "title") / ![alt](target), and HTML <img src="target">.
_MARKDOWN = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SHOWN = re.compile(r"!\[[^\]]*\]\(")
_HTML = re.compile(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", re.I)


def doc_pages(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def links(page: Path) -> list[str]:
    return links_in(page.read_text(encoding="utf-8"))


def links_in(text: str) -> list[str]:
    return _MARKDOWN.findall(text) + _HTML.findall(text)


def broken_links(pages: list[Path]) -> list[str]:
    """'page: target' for each link to a file of the repository that does not exist, and for each
    picture taken from another site."""
    broken = []
    for page in pages:
        for target in links(page):
            if re.match(r"^[a-z]+:", target):
                if target.lower().endswith((".png", ".jpg", ".gif", ".webp", ".svg")):
                    broken.append(f"{page.name}: {target} (pictures must be in the repository)")
            elif target.startswith("#"):
                continue
            elif not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.name}: {target}")
    return broken


def test_every_link_points_at_a_file():
    pages = doc_pages(REPO)
    pictures = [t for p in pages for t in links(p) if t.startswith(("docs/images/", "images/"))]
    assert len(pictures) >= 10, "the README and docs should show the pack"
    assert broken_links(pages) == []


def test_the_readme_opens_with_a_picture():
    head = (REPO / "README.md").read_text(encoding="utf-8").split("\n## ")[0]
    assert _SHOWN.search(head) or _HTML.search(head), "the README's first section should show the pack"


def test_pictures_are_small_and_all_shown():
    pictures = sorted(IMAGES.glob("*.png"))
    assert pictures, f"no pictures in {IMAGES}: run make docs-images"
    too_big = [f"{p.name}: {p.stat().st_size // 1024} KB" for p in pictures if p.stat().st_size > LIMIT]
    assert too_big == []
    shown = {(page.parent / t).resolve() for page in doc_pages(REPO) for t in links(page)}
    assert [p.name for p in pictures if p.resolve() not in shown] == []


def test_a_missing_picture_is_caught(tmp_path):
    """The checker itself: a link to a file that is not there, or to another site, is reported."""
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "docs" / "images" / "here.png").write_bytes(b"\x89PNG")
    readme = tmp_path / "README.md"
    readme.write_text(
        '![ok](docs/images/here.png)\n![gone](docs/images/gone.png "t")\n<img src="http://x.org/a.png">\n'
        "[a page](docs/gone.md#part) [a site](https://x.org/) [here](#top) [picture](docs/images/here.png)\n"
    )
    assert broken_links([readme]) == [
        "README.md: docs/images/gone.png",
        "README.md: docs/gone.md#part",
        "README.md: http://x.org/a.png (pictures must be in the repository)",
    ]
