"""How text from the room is shown: safe against terminal tricks, one stable colour per speaker."""

from __future__ import annotations

import os
import unicodedata
from typing import TextIO

from colorama import Fore, Style

from .protocol import speaker_colour_index

TERMINAL_COLOURS = (
    Fore.CYAN,
    Fore.GREEN,
    Fore.YELLOW,
    Fore.MAGENTA,
    Fore.BLUE,
    Fore.LIGHTRED_EX,
    Fore.LIGHTGREEN_EX,
    Fore.LIGHTCYAN_EX,
)
"""The speaker colours in a terminal, by protocol.speaker_colour_index; the page's style.css has the same eight."""
DIM = Style.DIM
RESET = Style.RESET_ALL


CONTINUATION = "\n    "
"""How a message's later lines are shown: indented, so none can pass for a new timestamped line."""


def neutralise(text: str, *, keep_newlines: bool = True) -> str:
    """Make text from a participant inert: escape sequences and control characters are shown, not obeyed.

    Kept newlines are indented, so a message cannot fake a line from someone else.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(CONTINUATION)
        elif ch == "\t":
            out.append("    ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co") or ch in "\u2028\u2029":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def speaker_colour(name: str) -> str:
    """The same name gets the same colour in every process and every run, and on the page."""
    return TERMINAL_COLOURS[speaker_colour_index(name)]


def colour_wanted(stream: TextIO) -> bool:
    """Colours only on a terminal (or when FORCE_COLOR is set), and never when NO_COLOR is set."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, colour: str, enabled: bool) -> str:
    return f"{colour}{text}{RESET}" if enabled and colour else text
