"""The README stays short and navigable, and no relative link in it or in docs/ points nowhere.

Pure and fast: reads Markdown files, imports nothing of the package.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 350

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or [text](target "title"); images too. Not inside inline code (stripped first).
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (but - and _), spaces to hyphens."""
    text = _INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a file's headings define, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and inline code."""
    found = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        found += _LINK.findall(_INLINE_CODE.sub("", line))
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links of `path` whose file is missing or whose #anchor is no heading there."""
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    return bad


def contents_links(text: str) -> list[str]:
    """The links of the README's contents list: the list under its '## Contents' heading."""
    lines = _prose_lines(text)
    start = next(i for i, line in enumerate(lines) if _HEADING.match(line) and slug(line.lstrip("#")) == "contents")
    block = []
    for line in lines[start + 1:]:
        if _HEADING.match(line):
            break
        block.append(line)
    return [t for line in block for t in _LINK.findall(line)]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it to {MAX_README_LINES} (move detail to docs/)"


def test_readme_has_a_contents_list_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = contents_links(text)
    assert len(targets) >= 5, f"the contents list has too few links: {targets}"
    have = anchors(README)
    missing = [t for t in targets if not t.startswith("#") or t[1:] not in have]
    assert not missing, f"contents links with no heading in README.md: {missing}"


def test_readme_shows_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make quickstart" in text and "make test" in text


@pytest.mark.parametrize(
    "path", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_the_link_checker_sees_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\n## Some `code`: thing\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#title-here) [ok](a.md#some-code-thing) [ok](#local) [web](https://x.org/y)\n"
        "```\n[in a fence](missing.md)\n```\n`[inline](missing.md)`\n# Local\n"
        "[gone](missing.md) [no anchor](a.md#nope)\n"
    )
    bad = broken_links(page)
    assert len(bad) == 2 and "missing.md" in bad[0] and "#nope" in bad[1], bad


def test_slug_follows_github():
    assert slug("Fortunes block (text: 3,612 labeled + 9,935 unlabeled)") == "fortunes-block-text-3612-labeled--9935-unlabeled"
    assert slug("4. Student (and baseline)") == "4-student-and-baseline"
    assert slug("Every row labeled: the transfer set, the search and the verdict") == (
        "every-row-labeled-the-transfer-set-the-search-and-the-verdict"
    )
