"""Reading a command's console log as a person sees it, whatever Rich's line wrapping did."""

from __future__ import annotations

import re

#: The gutter of a console log line: ``[12:34:56] INFO     `` (the time only when it changed).
GUTTER = re.compile(r"^(\[[\d:.]+\])?\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)?\s", re.M)


def squash(text: str) -> str:
    """``text`` without whitespace, so that the console's line wrapping does not matter."""
    return re.sub(r"\s+", "", text)


def console_text(output: str) -> str:
    """The messages of a command's console log, gutters and whitespace removed."""
    return squash(GUTTER.sub("", output))


def unwrapped(output: str) -> str:
    """The messages of a command's console log, gutters removed and whitespace collapsed to one space."""
    return re.sub(r"\s+", " ", GUTTER.sub(" ", output))
