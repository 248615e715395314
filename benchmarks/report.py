"""Write a benchmark's markdown block into benchmarks/README.md, between its own markers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def update_readme_section(block: str, begin: str, end: str, readme: Path = README) -> None:
    """Replace the text from ``begin`` to ``end`` with ``block`` (which carries both markers), or
    append ``block`` when the README has no such section yet; the rest of the file is kept."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
