"""A griffe extension for the docs build: render docstring doctests as code blocks.

Docstrings here carry runnable ``>>>`` examples (pytest runs them as doctests). Left
as plain text, Markdown would read ``params["w"]`` or ``[0.5, 1.0]`` as link syntax;
this wraps each run of doctest lines (up to the next blank line) in a ``pycon`` fence.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    in_block = False
    for line in text.splitlines():
        if not in_block and line.lstrip().startswith(">>>"):
            out.append("```pycon")
            in_block = True
        elif in_block and not line.strip():
            out.append("```")
            in_block = False
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
