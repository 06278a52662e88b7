"""The numbered messages a room holds in memory, for late joiners and reconnecting clients.

The transcript keeps every message; this keeps the recent ones, so replay needs no disk read.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from ..protocol import Chat, Role

MESSAGES_KEPT = 1000
"""Recent messages held in memory for replay and for clients that reconnect."""


class RecentMessages:
    """The room's recent messages, numbered: what a late joiner is replayed and a reconnecting client missed."""

    def __init__(self, replay: int) -> None:
        self.messages: deque[Chat] = deque(maxlen=max(replay, MESSAGES_KEPT))
        self.seq = 0
        """The number of the last message relayed; the next one gets seq + 1."""

    def __iter__(self) -> Iterator[Chat]:
        return iter(self.messages)

    def extend(self, earlier: Iterable[Chat]) -> None:
        """Take back the messages of a resumed transcript; numbering carries on after them."""
        self.messages.extend(earlier)
        self.seq = max((chat.seq for chat in self.messages), default=self.seq)

    def next_message(self, sender: str, content: str, role: str) -> Chat:
        """The next message, numbered but not yet kept: it is kept only once the transcript holds it."""
        return Chat(sender=sender, content=content, seq=self.seq + 1, id=uuid.uuid4().hex[:12],
                    ts=round(time.time(), 3), role=role)

    def keep(self, chat: Chat) -> None:
        """Hold a relayed message; one that replaces an earlier message (``/retry``) takes its place.

        The new version keeps its own, higher number and goes last, so numbers stay in order for
        everyone who replays; the old version is in the transcript only.
        """
        self.seq = chat.seq
        if chat.replaces:
            replaced = next((old for old in self.messages if old.id == chat.replaces), None)
            if replaced is not None:
                self.messages.remove(replaced)
        self.messages.append(chat)

    def latest_reply(self, sender: str | None = None) -> Chat | None:
        """The newest model message still held: ``sender``'s (any case), or any model's when None."""
        for chat in reversed(self.messages):
            if chat.role == Role.MODEL.value and (sender is None or chat.sender.casefold() == sender.casefold()):
                return chat
        return None

    def with_nonce(self, sender: str, nonce: str) -> Chat | None:
        """The message a sender already sent under this nonce, if it is still held."""
        return next((chat for chat in reversed(self.messages) if chat.nonce == nonce and chat.sender == sender), None)

    def recent(self, count: int, where: Callable[[Chat], bool] | None = None) -> list[Chat]:
        """The last ``count`` messages, or the last ``count`` of those ``where`` accepts."""
        chosen = [chat for chat in self.messages if where is None or where(chat)]
        return chosen[-count:] if count else []

    def since(self, last_seq: int) -> tuple[list[Chat], int]:
        """What came after ``last_seq``, and how many messages in between are no longer held."""
        missed = [chat for chat in self.messages if chat.seq > last_seq]
        lost = self.messages[0].seq - last_seq - 1 if self.messages and self.messages[0].seq > last_seq + 1 else 0
        return missed, lost
