"""Who is in the room, and the rules a newcomer must pass to get in. Pure bookkeeping, no I/O."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ErrorCode, Hello, ProtocolError, Role, Speed
from .settings import RoomSettings

MAX_REFUSALS_IN_A_ROW = 50
"""Bad frames a peer may send in a row before the hub treats it as abuse and closes it."""


class RateLimiter:
    """A token bucket: short bursts pass, sustained floods are refused."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        if self.per_second <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(eq=False)
class Peer:
    name: str
    role: Role
    protocol: int | None
    wants_stream: bool
    is_moderator: bool
    limiter: RateLimiter
    session: str
    link: Any = field(default=None, repr=False)
    """The network layer's handle on this peer's connection; the room passes it along and never uses it."""
    muted: bool = False
    refusals_in_a_row: int = 0
    draft_bytes: int = 0
    draft_turn: int = -1
    drafted: str = ""
    """What was relayed of this peer's reply in ``draft_turn``: what ``/stop`` keeps."""
    heard_turn: int = -1
    """The last turn in which this peer sent anything while holding the floor."""
    speed: Speed | None = None
    """The speed a model's client reported with its last reply or pass."""
    redo: str | None = None
    """The id of the message this model was asked to write again (``/retry``) and has not yet sent."""

    @property
    def speaks_extensions(self) -> bool:
        return self.protocol is not None

    def __post_init__(self) -> None:
        self.key = self.name.casefold()
        """Names are unique regardless of case; the room is keyed by this."""


class Members:
    """The peers in the room, keyed by case-folded name, and the checks that admit or refuse one."""

    def __init__(self, settings: RoomSettings) -> None:
        self.settings = settings
        self._peers: dict[str, Peer] = {}

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def find(self, name: str) -> Peer | None:
        return self._peers.get(name.casefold().strip())

    def is_present(self, peer: Peer) -> bool:
        return self._peers.get(peer.key) is peer

    def vet(self, hello: Hello) -> Peer | None:
        """Check a registration's token and name; returns the peer it replaces, or raises why not.

        A name already present is given back only to the client that holds its session secret: that
        is the same client reconnecting before the hub noticed its old connection is dead.
        """
        self.check_token(hello.token)
        stale = self._peers.get(hello.name.casefold())
        if stale is not None and not (hello.session and _same_secret(hello.session, stale.session)):
            raise ProtocolError(
                ErrorCode.NAME_TAKEN,
                f"The name {hello.name!r} is already taken in this room; choose another.",
                fatal=True,
            )
        return stale

    def check_token(self, offered: str | None) -> None:
        """Refuse anyone, participant or spectator, who does not present the hub's access token."""
        token = self.settings.token
        if token and not _same_secret(offered, token):
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "This hub needs an access token: pass the right one with --token.",
                fatal=True,
            )

    def enrol(self, hello: Hello, link: Any) -> Peer:
        """Add a vetted registration as a peer, unless the room is full."""
        settings = self.settings
        if len(self._peers) >= settings.max_clients:
            raise ProtocolError(
                ErrorCode.ROOM_FULL, f"The room is full ({settings.max_clients} participants).", fatal=True
            )
        is_moderator = hello.role is Role.HUMAN and (
            settings.moderator_token is None
            or _same_secret(hello.moderator_token, settings.moderator_token)
        )
        peer = Peer(
            name=hello.name,
            role=hello.role,
            protocol=hello.protocol,
            wants_stream=hello.stream and hello.protocol is not None and hello.role is Role.HUMAN,
            is_moderator=is_moderator,
            limiter=RateLimiter(settings.rate_per_second, settings.rate_burst),
            session=secrets.token_urlsafe(16),
            link=link,
        )
        self._peers[peer.key] = peer
        return peer

    def discharge(self, peer: Peer) -> bool:
        """Take a peer out; False when it was already gone (or replaced by a newer connection)."""
        if not self.is_present(peer):
            return False
        del self._peers[peer.key]
        return True

    def clear(self) -> list[Peer]:
        """Take everyone out at once (the hub is stopping); returns who was here."""
        peers = list(self._peers.values())
        self._peers.clear()
        return peers

    def meter(self, peer: Peer) -> None:
        """Spend one of a peer's rate tokens on a message or command, or refuse the frame."""
        if not peer.limiter.allow():
            raise ProtocolError(ErrorCode.RATE_LIMITED, "You are sending too fast; that frame was dropped. Slow down.")
        peer.refusals_in_a_row = 0

    @staticmethod
    def count_refusal(peer: Peer) -> bool:
        """Note a bad frame; True once a peer has sent so many in a row that it counts as abuse."""
        peer.refusals_in_a_row += 1
        return peer.refusals_in_a_row > MAX_REFUSALS_IN_A_ROW


def _same_secret(offered: str | None, expected: str) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), expected.encode())
