"""The conversation as Markdown: the one rendering that the page downloads and the console's /save writes.

The hub renders it (it sends it with the ``history`` frame), so the page and the console export the
same text. The console renders it itself only on a baseline hub, which has no ``history`` to give.
Times are in UTC, said so, because the hub's clock and the reader's may sit in different zones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from .protocol import Chat


def transcript_markdown(messages: Sequence[Chat]) -> str:
    """Messages as readable Markdown: each speaker in bold, each message quoted, nothing interpreted."""
    lines = ["# Party Chat transcript", ""]
    for chat in messages:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(chat.ts)) if chat.ts else ""
        stopped = ", stopped by the moderator" if chat.interrupted else ""
        stopped += f", whispered to {_markdown_escape(chat.whispered_to)}" if chat.whisper else ""
        stopped += ", written again" if chat.replaces else ""
        lines.append(f"**{_markdown_escape(chat.sender)}** ({chat.role}{', ' + when if when else ''}{stopped}):")
        lines.append("")
        lines.extend("> " + _markdown_escape(line) for line in chat.content.splitlines() or [""])
        lines.append("")
    return "\n".join(lines)


def _markdown_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>()#+!|~-])", r"\\\1", text)
