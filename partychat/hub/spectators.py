"""Spectators: connections that watch the room and take no part in it. Pure bookkeeping, no I/O.

A spectator is not a participant. It has no name, is never announced, holds no place in the
floor, and nothing it sends reaches the room. It receives what a human that asked for streams
receives. Joining therefore costs the hub one more recipient per frame and nothing else: the
room tells the others only how many are watching, and at most once a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..protocol import PROTOCOL_VERSION, ErrorCode, ProtocolError
from .members import Peer


@dataclass(eq=False)
class Spectator:
    """One watching connection; it has the fields the room's delivery code reads from a peer."""

    link: Any = field(default=None, repr=False)
    """The network layer's handle on this connection; the room passes it along and never uses it."""
    refusals_in_a_row: int = 0
    name: str = "a spectator"
    """Only for log lines; a spectator's identity is never shown to the room."""
    protocol: int = PROTOCOL_VERSION
    wants_stream: bool = True

    @property
    def speaks_extensions(self) -> bool:
        return True


Listener = Peer | Spectator
"""Anyone the room sends frames to."""


class Spectators:
    """The spectators watching, within ``--max-spectators``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._watching: dict[Spectator, None] = {}
        """Insertion-ordered, so frames reach spectators in the order they came."""

    def __iter__(self) -> Iterator[Spectator]:
        return iter(self._watching)

    def __len__(self) -> int:
        return len(self._watching)

    def __contains__(self, spectator: object) -> bool:
        return spectator in self._watching

    def seat(self, link: Any) -> Spectator:
        """Add a spectator, unless as many are already watching as the hub allows."""
        if len(self._watching) >= self.limit:
            raise ProtocolError(
                ErrorCode.ROOM_FULL,
                f"As many people are watching as this room allows ({self.limit}); try again later.",
                fatal=True,
            )
        spectator = Spectator(link=link)
        self._watching[spectator] = None
        return spectator

    def leave(self, spectator: Spectator) -> bool:
        """Take a spectator out; False when it had already gone."""
        if spectator not in self._watching:
            return False
        del self._watching[spectator]
        return True

    def clear(self) -> list[Spectator]:
        watching = list(self._watching)
        self._watching.clear()
        return watching
