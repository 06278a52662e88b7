"""What the room records: the transcript's records and the interface that keeps them. No I/O here.

Every line of a transcript is one record with a ``kind``: ``start`` (a hub began serving this
room), ``message`` (a relayed chat message, in the protocol's own fields: with its ``recipients``
and ``whisper`` when it did not go to every persona), ``withheld`` (a message kept out of the
room, with the reason), ``stage`` (who is on and off stage, each time that changes in a room that
runs scenes) or ``event`` (joins, leaves, commands...). ``Recording``
builds them, once, for every recorder: the hub's JSONL file (``transcript.py``, which also reads a
file back for ``--resume``) and ``MemoryRecorder`` for tests of the room.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..protocol import Chat, chat_from_wire


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
class SavedRoom:
    """What a transcript holds for a hub that resumes it."""

    room_id: str | None = None
    messages: list[Chat] = field(default_factory=list)
    stage: tuple[list[str], list[str]] | None = None
    """Who was on and off stage last, if the room ran scenes."""


class Recording(ABC):
    """The recorder the room writes to before it relays anything; subclasses say where records go."""

    location: str = ""
    """Where the whole record can be read, for a client told that older messages left the hub's memory."""

    def start(self, room_id: str) -> None:
        self.append("start", {"room": room_id, "ts": time.time()})

    def message(self, chat: Chat) -> None:
        """A relayed message, as its frame says it: the nonce too (a resumed hub still knows a re-sent line),
        and the recipients (a resumed hub replays it to them alone)."""
        data = replace(chat, replay=False).to_wire()
        del data["type"], data["colour"]  # the colour is the frame's, worked out from the name
        data.pop("whispered_to", None)  # words for people, worked out from the recipients
        self.append("message", data)

    def stage(self, on_stage: Sequence[str], off_stage: Sequence[str]) -> None:
        self.append("stage", {"on_stage": list(on_stage), "off_stage": list(off_stage), "ts": time.time()})

    def withheld(self, sender: str, role: str, content: str, reason: str) -> None:
        self.append("withheld", {"from": sender, "role": role, "content": content, "reason": reason,
                                 "ts": time.time()})

    def event(self, event: str, sentence: str, **fields: str) -> None:
        self.append("event", {"event": event, "content": sentence, "ts": time.time(), **fields})

    @abstractmethod
    def append(self, kind: str, data: dict[str, Any]) -> None:
        """Keep one record; it must be kept (on a file: flushed) when this returns."""

    @abstractmethod
    def close(self) -> None:
        """Nothing more will be recorded: write out what is pending."""


class MemoryRecorder(Recording):
    """Keeps the records in a list: for tests of the room, which then need no file."""

    location = "memory"

    def __init__(self) -> None:
        self.records: list[Record] = []

    def append(self, kind: str, data: dict[str, Any]) -> None:
        self.records.append(Record(kind, data))

    def close(self) -> None:
        pass


def saved_room(records: Iterable[Record]) -> SavedRoom:
    """The room id and the relayed messages among these records, for ``--resume``; replaced versions left out."""
    saved = SavedRoom()
    for record in records:
        if record.kind == "start" and isinstance(record.data.get("room"), str):
            saved.room_id = record.data["room"]
        elif record.kind == "message" and record.seq is not None:
            chat = chat_from_wire(record.data)
            if chat is not None:
                saved.messages.append(chat)
        elif record.kind == "stage":
            saved.stage = (_names(record.data.get("on_stage")), _names(record.data.get("off_stage")))
    replaced = {chat.replaces for chat in saved.messages if chat.replaces}  # /retry: the new version counts
    saved.messages = [chat for chat in saved.messages if chat.id not in replaced]
    return saved


def _names(value: Any) -> list[str]:
    return [name for name in value if isinstance(name, str)] if isinstance(value, list) else []
