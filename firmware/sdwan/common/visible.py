"""Text from the network made safe for a person's terminal.

Link names, versions, event texts, site names and reasons reach socketctl, popctl and the
console from other sites and the PoP. Written raw, an escape sequence among them would act on
the operator's terminal (clear it, move the cursor over earlier lines, retitle the window) and
a newline would forge a line of output. `visible()` replaces every character that is not
printable with an escape that shows what it was: `\\x1b` for ESC, `\\n`, `\\x7f`, `\\x9b`, and
`\\u202e` for other invisible characters such as bidirectional overrides. Printable text,
including any script, passes unchanged, and so does a backslash: the result is for people,
the JSON output (`--json`) stays exact.

`VisibleWriter` wraps the stream a table is written to, so that a field a formatter forgot to
pass through `visible()` still cannot reach the terminal raw; only the formatter's own line ends
pass.
"""

from __future__ import annotations

import io
from typing import Any, TextIO

__all__ = ["VisibleWriter", "visible", "visible_lines"]


def _escape(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def visible(value: Any) -> str:
    """str(value), every character that is not printable replaced by its escape (newlines
    and tabs too: one value stays on its line and in its column)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def visible_lines(text: str) -> str:
    """Like visible(), but the line ends are kept: for whole blocks of output."""
    if text.isprintable():
        return text
    return "\n".join(visible(line) for line in text.split("\n"))


class VisibleWriter(io.TextIOBase):
    """A text stream whose writes go through visible_lines() to `out`."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.out.write(visible_lines(text))
        return len(text)

    def flush(self) -> None:
        if not getattr(self.out, "closed", False):
            self.out.flush()
