"""The room's transcript: an append-only JSONL file, written before anything is relayed.

Every line is one object with a ``kind``: ``start`` (a hub began serving this room), ``message``
(a relayed chat message, with its ``recipients`` and ``whisper`` when it did not go to every
persona), ``withheld`` (a message kept out of the room, with the reason), ``stage`` (who is on and
off stage, each time that changes in a room that runs scenes) or ``event`` (joins, leaves,
commands...). This module is the only one that writes or reads them.

Durability: each record is written and flushed to the operating system before the hub relays the
message, so a hub killed with SIGKILL loses nothing it relayed. ``fsync=True`` also forces every
record to disk, which survives power loss at the cost of a disk sync per message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..protocol import Chat, Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One line of the transcript."""

    kind: str
    data: dict[str, Any]

    @property
    def seq(self) -> int | None:
        value = self.data.get("seq")
        return value if isinstance(value, int) else None


@dataclass
class History:
    """What a transcript holds for a hub that resumes it."""

    room_id: str | None = None
    messages: list[Chat] = field(default_factory=list)
    stage: tuple[list[str], list[str]] | None = None
    """Who was on and off stage last, if the room ran scenes."""


def default_path(directory: Path) -> Path:
    return directory / time.strftime("transcript-%Y%m%d-%H%M%S.jsonl")


class Transcript:
    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(path):
            self._file.write("\n")

    def start(self, room_id: str) -> None:
        self._append("start", {"room": room_id, "ts": time.time()})

    def message(self, chat: Chat) -> None:
        data = {"from": chat.sender, "content": chat.content, "id": chat.id, "seq": chat.seq, "ts": chat.ts,
                "role": chat.role}
        if chat.interrupted:
            data["interrupted"] = True
        if chat.nonce:
            data["nonce"] = chat.nonce  # so a resumed hub still recognises a line its sender re-sends
        if chat.recipients is not None:
            data["recipients"] = list(chat.recipients)  # so a resumed hub replays it to them alone
        if chat.whisper:
            data["whisper"] = True
        self._append("message", data)

    def stage(self, on_stage: Sequence[str], off_stage: Sequence[str]) -> None:
        self._append("stage", {"on_stage": list(on_stage), "off_stage": list(off_stage), "ts": time.time()})

    def withheld(self, sender: str, role: str, content: str, reason: str) -> None:
        self._append("withheld", {"from": sender, "role": role, "content": content, "reason": reason,
                                  "ts": time.time()})

    def event(self, event: str, sentence: str, **fields: str) -> None:
        self._append("event", {"event": event, "content": sentence, "ts": time.time(), **fields})

    def _append(self, kind: str, data: dict[str, Any]) -> None:
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


def load_history(path: Path) -> History:
    """The room id and the relayed messages of a transcript, for ``--resume``."""
    history = History()
    for record in read_records(path):
        data = record.data
        if record.kind == "start" and isinstance(data.get("room"), str):
            history.room_id = data["room"]
        elif record.kind == "message" and record.seq is not None:
            history.messages.append(
                Chat(
                    sender=str(data.get("from", "")),
                    content=str(data.get("content", "")),
                    seq=record.seq,
                    id=str(data.get("id", "")),
                    ts=float(data.get("ts", 0.0)),
                    role=str(data.get("role", Role.MODEL.value)),
                    interrupted=data.get("interrupted") is True,
                    nonce=data["nonce"] if isinstance(data.get("nonce"), str) else None,
                    recipients=_names(data.get("recipients")),
                    whisper=data.get("whisper") is True,
                )
            )
        elif record.kind == "stage":
            history.stage = (list(_names(data.get("on_stage")) or ()), list(_names(data.get("off_stage")) or ()))
    return history


def _names(value: Any) -> tuple[str, ...] | None:
    return tuple(name for name in value if isinstance(name, str)) if isinstance(value, list) else None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as source:
        source.seek(-1, os.SEEK_END)
        return source.read(1) == b"\n"
