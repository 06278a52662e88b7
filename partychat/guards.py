"""Floor-health guards: the hub's checks on every model reply before the room hears it. Pure logic.

Small models loop: they repeat what was just said, answer with a lone "...", or go on to write the
other characters' lines too. The hub checks each reply, so the guards cover every client, the
original project's included:

- **repeat**: a reply whose word trigrams mostly (more than ``REPEAT_THRESHOLD``) appear in one of
  the last ``REPEAT_WINDOW`` messages is withheld. Words are compared case-folded, without
  punctuation; a reply too short to have a trigram counts only if it is the same words exactly.
- **empty**: a reply with no letter or digit at all (only whitespace, punctuation or symbols such
  as "...", "*" or an emoji) is withheld.
- **impersonation**: a line written as another participant ("TinkerBot: ..." at the start of a
  line or after a sentence, inside Zen Sage's reply) is cut off there, with everything after it;
  if nothing is left, the reply is withheld. The persona spoken for is reported, so that in natural
  mode it can be given the next turn to speak for itself.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

REPEAT_NGRAM = 3
REPEAT_THRESHOLD = 0.6
"""Share of a reply's distinct word trigrams found in one recent message above which it is a repeat."""
REPEAT_WINDOW = 5
"""How many recent messages a reply is compared with."""


class Guard(str, Enum):
    REPEAT = "repeat"
    EMPTY = "empty"
    IMPERSONATION = "impersonation"


@dataclass(frozen=True)
class Earlier:
    """A recent message, as the guards need it."""

    sender: str
    content: str


@dataclass(frozen=True)
class Verdict:
    """What to do with a reply: relay ``content`` (perhaps cut), or withhold it when ``content`` is None."""

    content: str | None
    guard: Guard | None = None
    """The guard that acted, if any."""
    removed: str = ""
    """The text kept out of the room (the whole reply when withheld, the cut-off tail when cut)."""
    impersonated: str | None = None
    """The participant a cut line was written as."""
    reason: str = ""
    """A sentence for the log, the room and the transcript."""

    @property
    def withheld(self) -> bool:
        return self.content is None


def check_reply(content: str, author: str, participants: Iterable[str], recent: Sequence[Earlier]) -> Verdict:
    """Check one model reply against the recent messages of the room."""
    kept, impersonated = _cut_impersonation(content, author, participants)
    if impersonated is not None and not _has_words(kept):
        return Verdict(None, Guard.IMPERSONATION, content, impersonated,
                       f"{author}'s reply was withheld: it was written as {impersonated}.")
    if not _has_words(kept):
        return Verdict(None, Guard.EMPTY, content, reason=f"{author}'s reply was withheld: it has no words.")
    repeated = _repeats(kept, recent)
    if repeated is not None:
        whose = "its own" if repeated.sender == author else f"{repeated.sender}'s"
        return Verdict(None, Guard.REPEAT, content,
                       reason=f"{author}'s reply was withheld: it repeats {whose} recent message.")
    if impersonated is not None:
        return Verdict(kept, Guard.IMPERSONATION, content[len(kept):], impersonated,
                       f"{author}'s reply was cut where it began speaking as {impersonated}.")
    return Verdict(content)


def _has_words(text: str) -> bool:
    return any(unicodedata.category(ch)[0] in "LN" for ch in text)


def _cut_impersonation(content: str, author: str, participants: Iterable[str]) -> tuple[str, str | None]:
    """The reply up to the first line written as someone else, and who that was."""
    others = sorted((name for name in participants if name.casefold() != author.casefold()), key=len, reverse=True)
    if not others:
        return content, None
    names = "|".join(re.escape(name) for name in others)
    # A speaker label: at the start of a line, or after a finished sentence; **bold** and @ allowed.
    pattern = re.compile(rf"(?:^|(?<=\n)|(?<=[.!?])[ \t]+)[ \t]*[*_]*@?({names})[*_]*[ \t]*:", re.IGNORECASE)
    match = pattern.search(content)
    if match is None:
        return content, None
    spoken_for = next(name for name in others if name.casefold() == match.group(1).casefold())
    return content[:match.start()].rstrip(), spoken_for


def _words(text: str) -> list[str]:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return re.findall(r"\w+", folded)


def _grams(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1)}


def _repeats(content: str, recent: Sequence[Earlier]) -> Earlier | None:
    """The recent message this reply mostly repeats, if any."""
    words = _words(content)
    if not words:
        return None
    mine = _grams(words)
    for earlier in reversed(recent[-REPEAT_WINDOW:]):
        theirs = _words(earlier.content)
        if not mine:
            if words == theirs:
                return earlier
            continue
        if len(mine & _grams(theirs)) / len(mine) > REPEAT_THRESHOLD:
            return earlier
    return None
