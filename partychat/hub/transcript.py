"""The room's transcript as a file: an append-only JSONL file, written before anything is relayed.

The records themselves (``start``, ``message``, ``withheld``, ``event``) are defined in
``record.py``; this module writes them to a file and reads a file back for ``--resume``.

A ``message`` with ``replaces`` is a new version of the earlier message with that id (``/retry``):
the earlier line stays in the file as it was said, and from then on counts as replaced.

Durability: each record is written and flushed to the operating system before the hub relays the
message, so a hub killed with SIGKILL loses nothing it relayed. ``fsync=True`` also forces every
record to disk, which survives power loss at the cost of a disk sync per message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from .record import Record, Recording, SavedRoom, saved_room

__all__ = ["Record", "SavedRoom", "Transcript", "default_path", "load_saved_room", "read_records"]

log = logging.getLogger(__name__)


def default_path(directory: Path) -> Path:
    return directory / time.strftime("transcript-%Y%m%d-%H%M%S.jsonl")


class Transcript(Recording):
    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self.location = str(path)
        self.fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(path):
            self._file.write("\n")

    def append(self, kind: str, data: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, **data}, ensure_ascii=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def read_records(path: Path) -> list[Record]:
    """Load a transcript; a torn last line (a crash mid-write) is skipped, not fatal."""
    records: list[Record] = []
    with path.open(encoding="utf-8") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                kind = data.pop("kind")
            except (ValueError, KeyError, AttributeError, TypeError):
                log.warning("%s:%d: skipping an unreadable transcript line", path, number)
                continue
            records.append(Record(kind=str(kind), data=data))
    return records


def load_saved_room(path: Path) -> SavedRoom:
    """The room id and the relayed messages of a transcript, for ``--resume``."""
    return saved_room(read_records(path))


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as source:
        source.seek(-1, os.SEEK_END)
        return source.read(1) == b"\n"
