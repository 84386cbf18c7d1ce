"""The README's tested command blocks: a fenced block right after an HTML comment marker.

A block is marked ``<!-- readme-test: NAME -->``; its commands are its non-empty lines that are not
comments, with ``\\``-continued lines joined. Tests run them as written.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands(name: str) -> list[str]:
    """The commands of the block marked ``<!-- readme-test: {name} -->`` in README.md."""
    marker = f"<!-- readme-test: {name} -->"
    text = README.read_text()
    assert marker in text, f"the README lost its tested block {marker}"
    block = re.search(r"```[a-z]*\n(.*?)```", text[text.index(marker) :], re.S)
    assert block is not None, f"no fenced block after {marker}"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
