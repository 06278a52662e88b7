"""Lorebooks: entries whose keys turn up in the conversation join one persona's prompt.

Three file shapes hold the same thing: SillyTavern's world-info JSON (``{"entries": {"0": {"key":
[...], ...}}}``, what ``--lorebook`` takes), a card's ``character_book`` (Character Card V2/V3 spec,
``{"entries": [{"keys": [...], ...}]}``) and the V3 spec's stand-alone ``{"spec": "lorebook_v3",
"data": ...}``. They are read into one ``Lorebook``; the matching and placement below take no I/O.

Supported per entry: keys (plain, ``/regex/flags`` as SillyTavern writes them, or ``use_regex``),
secondary keys with SillyTavern's logic (and any, not all, not any, and all), case sensitivity,
whole words, constant entries, enabled, insertion order, priority and scan depth. Not supported:
recursive scanning, probability, inclusion groups, timed effects and the V3 ``@@decorators`` (their
lines are left out of the content). ``position`` is not honoured either: see ``Lore``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..protocol import Chat

MAX_FILE_BYTES = 20 * 1024 * 1024
"""Largest card or lorebook read; a bigger file is refused before it is read (cards are mostly image)."""

LORE_ROLE = "lore"
"""The role of a lore line placed among a persona's history (never a room message)."""

DEFAULT_SCAN_DEPTH = 2
"""Messages scanned for keys when neither the book nor the entry says: SillyTavern's default."""

AND_ANY, NOT_ALL, NOT_ANY, AND_ALL = 0, 1, 2, 3
"""How secondary keys combine with a primary key that matched (SillyTavern's ``selectiveLogic``)."""

_ST_REGEX = re.compile(r"^/(.+)/([a-z]*)$", re.DOTALL)
_DECORATOR = re.compile(r"^@@.*$\n?", re.MULTILINE)


class PersonaFileError(ValueError):
    """A card or lorebook that cannot be used, in one sentence that names the file and what is wrong."""


def read_limited(path: Path, what: str) -> bytes:
    """The file's bytes, refusing a file over MAX_FILE_BYTES before reading any of it."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PersonaFileError(f"{path}: the {what} is {size / 2**20:.0f} MB; the limit is "
                                   f"{MAX_FILE_BYTES // 2**20} MB.")
        if not path.is_file():
            raise PersonaFileError(f"{path}: the {what} is not a file.")
        return path.read_bytes()
    except FileNotFoundError:
        raise PersonaFileError(f"{path}: no such {what} file.") from None
    except OSError as error:
        raise PersonaFileError(f"{path}: cannot read the {what}: {error.strerror or error}.") from None


@dataclass(frozen=True)
class LoreEntry:
    keys: tuple[str, ...]
    content: str
    label: str
    """How the log names the entry: its name, else its comment, else its first key."""
    secondary_keys: tuple[str, ...] = ()
    logic: int = AND_ANY
    constant: bool = False
    order: float = 100
    """Insertion order: lower goes higher in the prompt, and gives way first."""
    priority: float | None = None
    """When the budget is tight, lower priority gives way first (insertion order when there is none)."""
    case_sensitive: bool = False
    whole_words: bool = False
    regex: bool = False
    scan_depth: int | None = None


@dataclass(frozen=True)
class Lorebook:
    name: str
    entries: tuple[LoreEntry, ...]
    scan_depth: int | None = None
    token_budget: int | None = None
    own: bool = False
    """A card's own book: its entries are kept before a shared book's when the budget is tight (spec V2)."""


def read_lorebook(path: Path) -> Lorebook:
    """A shared lorebook file: SillyTavern world info, lorebook_v3, or a bare character_book."""
    raw = read_limited(path, "lorebook")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise PersonaFileError(f"{path}: the lorebook is not UTF-8 text.") from None
    except json.JSONDecodeError as error:
        raise PersonaFileError(f"{path}: the lorebook's JSON is broken ({error.msg}, line {error.lineno} "
                               f"column {error.colno}).") from None
    if isinstance(data, dict) and data.get("spec") == "lorebook_v3":
        data = data.get("data")
    if not isinstance(data, dict) or "entries" not in data:
        raise PersonaFileError(f"{path}: not a lorebook: SillyTavern world info or a character_book has "
                               "an 'entries' field.")
    return book_from_json(data, str(path), name=path.stem)


def book_from_json(data: Any, where: str, name: str = "", own: bool = False) -> Lorebook:
    """A lorebook object, in either field naming (character_book's ``keys``, world info's ``key``)."""
    if not isinstance(data, dict):
        raise PersonaFileError(f"{where}: the lorebook must be a JSON object.")
    raw_entries = data.get("entries")
    if isinstance(raw_entries, dict):  # world info: entries keyed by their uid
        raw_entries = list(raw_entries.values())
    if not isinstance(raw_entries, list):
        raise PersonaFileError(f"{where}: the lorebook's 'entries' must be a list or an object.")
    entries = [entry for number, raw in enumerate(raw_entries, start=1)
               if (entry := _entry(raw, f"{where}, lore entry {number}")) is not None]
    return Lorebook(name=str(data.get("name") or name), entries=tuple(entries),
                    scan_depth=_number(data, "scan_depth", where, whole=True),
                    token_budget=_number(data, "token_budget", where, whole=True), own=own)


def _entry(raw: Any, where: str) -> LoreEntry | None:
    """One entry, or None when it is disabled or has no content (it can never add anything)."""
    if not isinstance(raw, dict):
        raise PersonaFileError(f"{where}: must be a JSON object.")
    extensions = raw.get("extensions") if isinstance(raw.get("extensions"), dict) else {}
    world_info = "key" in raw and "keys" not in raw

    def pick(*names: str, source: dict[str, Any] = raw) -> Any:
        return next((source[n] for n in names if source.get(n) is not None), None)

    if raw.get("enabled") is False or raw.get("disable") is True:
        return None
    content = pick("content")
    if content is not None and not isinstance(content, str):
        raise PersonaFileError(f"{where}: 'content' must be text.")
    content = _DECORATOR.sub("", content or "").strip()
    if not content:
        return None
    keys = _keys(pick("keys", "key"), where, "keys")
    secondary = _keys(pick("secondary_keys", "keysecondary"), where, "secondary_keys")
    # World info entries are all selective; a character_book entry uses its secondary keys only when selective.
    if not (world_info or raw.get("selective") is True):
        secondary = ()
    logic = pick("selectiveLogic")
    logic = pick("selectiveLogic", source=extensions) if logic is None else logic
    logic = AND_ANY if logic is None else logic
    if logic not in (AND_ANY, NOT_ALL, NOT_ANY, AND_ALL) or isinstance(logic, bool):
        raise PersonaFileError(f"{where}: 'selectiveLogic' must be 0, 1, 2 or 3, not {logic!r}.")
    case = pick("case_sensitive", "caseSensitive")
    case = pick("case_sensitive", source=extensions) if case is None else case
    whole = pick("matchWholeWords")
    whole = pick("match_whole_words", source=extensions) if whole is None else whole
    scan_depth = pick("scanDepth")
    scan_depth = pick("scan_depth", source=extensions) if scan_depth is None else scan_depth
    order = pick("insertion_order", "order")
    label = next((raw[n] for n in ("name", "comment") if raw.get(n)), None) or (keys[0] if keys else "an entry")
    return LoreEntry(
        keys=keys, content=content, label=str(label)[:60], secondary_keys=secondary, logic=logic,
        constant=raw.get("constant") is True, order=_as_number(order, where, "insertion_order", 100),
        priority=_as_number(pick("priority"), where, "priority", None), case_sensitive=case is True,
        whole_words=whole is True, regex=raw.get("use_regex") is True,
        scan_depth=int(_as_number(scan_depth, where, "scan_depth", 0)) or None,
    )


def _keys(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # some older exports keep keys as one comma-separated string
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(key, str) for key in value):
        raise PersonaFileError(f"{where}: '{name}' must be a list of text.")
    return tuple(key.strip() for key in value if key.strip())


def _as_number(value: Any, where: str, name: str, default: float | None) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PersonaFileError(f"{where}: '{name}' must be a number, not {value!r}.")
    return value


def _number(data: dict[str, Any], name: str, where: str, whole: bool = False) -> int | None:
    value = _as_number(data.get(name), where, name, None)
    return None if value is None else int(value) if whole else value


# The matching: no I/O, nothing but text.

def key_matches(entry: LoreEntry, key: str, text: str) -> bool:
    """Whether one key occurs in the scanned text, honouring the entry's case, whole-word and regex settings.

    A key written ``/pattern/flags`` is a regular expression, as in SillyTavern; an invalid one never
    matches (V3 spec).
    """
    written = _ST_REGEX.match(key)
    if entry.regex or written:
        pattern, flags = (written.group(1), written.group(2)) if written else (key, "")
        ignore_case = "i" in flags if written else not entry.case_sensitive
        options = re.IGNORECASE if ignore_case else 0
        options |= re.DOTALL if "s" in flags else 0
        options |= re.MULTILINE if "m" in flags else 0
        try:
            return re.search(pattern, text, options) is not None
        except re.error:
            return False
    options = 0 if entry.case_sensitive else re.IGNORECASE
    if entry.whole_words:
        return re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text, options) is not None
    return key in text if entry.case_sensitive else key.casefold() in text.casefold()


def fires(entry: LoreEntry, text: str, fill: Callable[[str], str] = str) -> bool:
    """Whether the entry joins the prompt for this scanned text: constant, or a key and its secondary logic.

    ``fill`` replaces macros such as ``{{char}}`` in the keys before they are looked for.
    """
    if entry.constant:
        return True
    if not any(key_matches(entry, fill(key), text) for key in entry.keys):
        return False
    if not entry.secondary_keys:
        return True
    hits = [key_matches(entry, fill(key), text) for key in entry.secondary_keys]
    return {AND_ANY: any(hits), NOT_ALL: not all(hits), NOT_ANY: not any(hits), AND_ALL: all(hits)}[entry.logic]


def scanned_text(window: Sequence[Chat], end: int, depth: int) -> str:
    """The ``depth`` messages up to and including ``window[end]``, each as ``Name: text`` (as SillyTavern scans)."""
    return "\n".join(f"{chat.sender}: {chat.content}" for chat in window[max(0, end - depth + 1): end + 1])


def estimated_tokens(text: str) -> int:
    """A book's own ``token_budget`` is checked against this estimate (about 4 characters a token), not the model."""
    return len(text) // 4 + 1


EntryId = tuple[int, int]
"""(book number, entry number) within one persona's books."""


@dataclass(frozen=True)
class Lore:
    """One persona's books, and where their entries go in its prompt for one request.

    Where the entries go, and why: each entry is placed just before the message of the window at
    which it first fires (its keys found in the ``scan_depth`` messages ending there), and stays
    there while that message is in the window. For the turn being written, that is just before the
    newest messages. Later turns only add entries, before their own newest messages; an entry once
    placed is not moved or repeated. So between two cuts of the history window a persona's prompt
    only grows at its end, and a prompt cache (llama.cpp's, a server's) can reuse all of it; only
    when old messages leave the window, or the budget is tight, can the lore change in the middle.
    This is also why ``position`` (before or after the character's description) is not honoured:
    the persona block stays the same from turn to turn.

    When the context budget is tight, entries give way (``smaller``) before any history does: a
    shared book's before a card's own, then lowest priority, then lowest insertion order, then the
    oldest placed. A book's own ``token_budget`` is kept as entries are placed, in order, so it
    never removes one placed earlier.
    """

    books: tuple[Lorebook, ...]
    fill: Callable[[str], str] = str
    """Replaces macros (``{{char}}``, ``{{user}}``) in keys and content."""
    left_out: frozenset[EntryId] = field(default_factory=frozenset)

    def entry(self, ref: EntryId) -> LoreEntry:
        return self.books[ref[0]].entries[ref[1]]

    def placements(self, window: Sequence[Chat]) -> list[list[EntryId]]:
        """For each message of the window, the entries placed just before it, in insertion order."""
        placed: set[EntryId] = set(self.left_out)
        spent = [0] * len(self.books)
        result: list[list[EntryId]] = []
        for end in range(len(window)):
            here = [ref for ref in self._all() if ref not in placed and self._fires_at(ref, window, end)]
            kept = []
            for ref in sorted(here, key=self._keep_key, reverse=True):
                book, cost = self.books[ref[0]], estimated_tokens(self.entry(ref).content)
                if book.token_budget is not None and spent[ref[0]] + cost > book.token_budget:
                    continue
                spent[ref[0]] += cost
                kept.append(ref)
            placed.update(here)
            result.append(sorted(kept, key=lambda ref: (self.entry(ref).order, not self.books[ref[0]].own, ref)))
        return result

    def interleave(self, window: Sequence[Chat]) -> list[Chat]:
        """The window with each placed entry as a lore line just before its message."""
        lines: list[Chat] = []
        for chat, refs in zip(window, self.placements(window), strict=True):
            lines += [Chat(sender="", content=self.text(ref), role=LORE_ROLE) for ref in refs]
            lines.append(chat)
        return lines

    def text(self, ref: EntryId) -> str:
        return f"[Lore] {self.fill(self.entry(ref).content)}"

    def smaller(self, window: Sequence[Chat]) -> Lore | None:
        """The same lore less the entry that gives way first; None when none is placed."""
        placed = [(ref, position) for position, refs in enumerate(self.placements(window)) for ref in refs]
        if not placed:
            return None
        ref, _ = min(placed, key=lambda item: (*self._keep_key(item[0]), item[1]))
        return replace(self, left_out=self.left_out | {ref})

    def fired(self, window: Sequence[Chat]) -> list[LoreEntry]:
        """The entries whose keys the newest messages hold (the scan for the turn being written)."""
        if not window:
            return []
        return [self.entry(ref) for ref in self._all() if self._fires_at(ref, window, len(window) - 1)]

    def _all(self) -> Iterator[EntryId]:
        for b, book in enumerate(self.books):
            for e in range(len(book.entries)):
                yield (b, e)

    def _fires_at(self, ref: EntryId, window: Sequence[Chat], end: int) -> bool:
        book, entry = self.books[ref[0]], self.entry(ref)
        depth = entry.scan_depth or book.scan_depth or DEFAULT_SCAN_DEPTH
        return fires(entry, scanned_text(window, end, depth), self.fill)

    def _keep_key(self, ref: EntryId) -> tuple[bool, float, float]:
        """Sorts entries from the first to give way to the last."""
        entry = self.entry(ref)
        return (self.books[ref[0]].own, entry.order if entry.priority is None else entry.priority, entry.order)
