"""The room: who is in it, what was said, and where each frame goes.

Every chat message is stored (transcript first), numbered, and then written to every recipient at
once, in the manner of websockets' ``broadcast()``, never waiting on a peer. What a peer has not read yet
stays in its own write buffer; a peer whose buffer passes ``max_buffered_bytes`` is disconnected,
so one reader that stops cannot slow the room or grow the hub's memory without bound.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

from .commands import run_command
from .floor import Floor, Mode
from .protocol import (
    PROTOCOL_VERSION,
    Chat,
    Command,
    Draft,
    ErrorCode,
    FloorState,
    Hello,
    Notice,
    Pass,
    ProtocolError,
    Refusal,
    Role,
    Say,
    ServerFrame,
    Stream,
    encode,
)
from .transcript import Transcript, read_records

log = logging.getLogger("partychat.hub")

HISTORY_KEPT = 1000
"""Recent messages held in memory for replay and for clients that reconnect."""


@dataclass
class RoomSettings:
    mode: Mode = Mode.ROUND_ROBIN
    max_turns: int | None = None
    replay: int = 20
    max_clients: int = 64
    max_buffered_bytes: int = 1024 * 1024
    rate_per_second: float = 2.0
    rate_burst: int = 20
    token: str | None = None
    moderator_token: str | None = None


class RateLimiter:
    """A token bucket: short bursts pass, sustained floods are refused."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.refused_in_a_row = 0

    def allow(self) -> bool:
        if self.per_second <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused_in_a_row = 0
            return True
        self.refused_in_a_row += 1
        return False


@dataclass(eq=False)
class Peer:
    ws: ServerConnection
    name: str
    role: Role
    protocol: int | None
    wants_stream: bool
    is_moderator: bool
    limiter: RateLimiter
    muted: bool = False

    @property
    def speaks_extensions(self) -> bool:
        return self.protocol is not None

    def __post_init__(self) -> None:
        self.key = self.name.casefold()
        """Names are unique regardless of case; the room is keyed by this."""


class Room:
    def __init__(self, settings: RoomSettings, transcript: Transcript) -> None:
        self.settings = settings
        self.transcript = transcript
        self.floor = Floor(mode=settings.mode, max_turns=settings.max_turns)
        self.peers: dict[str, Peer] = {}
        self.history: deque[Chat] = deque(maxlen=max(settings.replay, HISTORY_KEPT))
        self.seq = 0
        self._last_floor: FloorState | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ membership

    def resume_from(self, records_path: Path) -> None:
        """Carry on a conversation from an earlier transcript; sequence numbers continue."""
        for record in read_records(records_path):
            if record.kind == "message" and record.seq is not None:
                data = record.data
                self.seq = max(self.seq, record.seq)
                self.history.append(
                    Chat(
                        sender=str(data.get("from", "")),
                        content=str(data.get("content", "")),
                        seq=record.seq,
                        id=str(data.get("id", "")),
                        ts=float(data.get("ts", 0.0)),
                        role=str(data.get("role", Role.MODEL.value)),
                    )
                )
        log.info("Resumed %d messages from %s; next sequence number is %d",
                 len(self.history), records_path, self.seq + 1)

    def admit(self, ws: ServerConnection, hello: Hello) -> Peer:
        """Check a registration against the room's rules and add the peer, or raise why not."""
        settings = self.settings
        if settings.token and not _same_secret(hello.token, settings.token):
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "This hub needs an access token: pass the right one with --token.",
                fatal=True,
            )
        if hello.name.casefold() in self.peers:
            raise ProtocolError(
                ErrorCode.NAME_TAKEN,
                f"The name {hello.name!r} is already taken in this room; choose another.",
                fatal=True,
            )
        if len(self.peers) >= settings.max_clients:
            raise ProtocolError(
                ErrorCode.ROOM_FULL, f"The room is full ({settings.max_clients} participants).", fatal=True
            )
        is_moderator = hello.role is Role.HUMAN and (
            settings.moderator_token is None
            or _same_secret(hello.moderator_token, settings.moderator_token)
        )
        peer = Peer(
            ws=ws,
            name=hello.name,
            role=hello.role,
            protocol=hello.protocol,
            wants_stream=hello.stream,
            is_moderator=is_moderator,
            limiter=RateLimiter(settings.rate_per_second, settings.rate_burst),
        )
        self.peers[peer.key] = peer
        self.deliver(
            peer,
            Notice(f"Connected as {peer.name}", event="welcome", protocol=PROTOCOL_VERSION),
        )
        if peer.role is Role.MODEL:
            self.floor.add_model(peer.name)
        self.announce("join", f"{peer.name} joined the chat", name=peer.name, role=peer.role.value,
                    exclude=peer)
        self._replay_to(peer, hello.last_seq)
        self.publish_floor()
        return peer

    def remove(self, peer: Peer, reason: str = "left the chat") -> None:
        if self.peers.get(peer.key) is not peer:
            return
        del self.peers[peer.key]
        if peer.role is Role.MODEL:
            self.floor.remove_model(peer.name)
        self.announce("leave", f"{peer.name} {reason}", name=peer.name)
        self.publish_floor()

    def find(self, name: str) -> Peer | None:
        return self.peers.get(name.casefold().strip())

    # ------------------------------------------------------------ routing

    def receive(self, peer: Peer, frame: Say | Draft | Pass | Command) -> None:
        """Route one validated frame from a peer."""
        if isinstance(frame, Draft):
            self._relay_draft(peer, frame)
            return
        if isinstance(frame, Pass):
            self._pass_turn(peer, frame)
            return
        if not peer.limiter.allow():
            abusive = peer.limiter.refused_in_a_row > self.settings.rate_burst * 3
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "You are sending too fast; that frame was dropped. Slow down.",
                fatal=abusive,
            )
        if isinstance(frame, Command):
            run_command(self, peer, frame)
            return
        self.post(peer, frame.content, opening=frame.opening)

    def post(self, peer: Peer, content: str, *, opening: bool = False, addressed: str | None = None) -> None:
        """Accept a chat message: check the floor, store it, then relay it."""
        refusal = self._why_withheld(peer, opening)
        if refusal is not None:
            code, sentence = refusal
            self.transcript.append(
                "withheld",
                {"from": peer.name, "role": peer.role.value, "content": content, "reason": code.value,
                 "ts": time.time()},
            )
            log.info("withheld from %s (%s): %s", peer.name, code.value, content)
            self.refuse(peer, code, sentence)
            return
        self.seq += 1
        chat = Chat(
            sender=peer.name,
            content=content,
            seq=self.seq,
            id=uuid.uuid4().hex[:12],
            ts=round(time.time(), 3),
            role=peer.role.value,
        )
        wire = chat.to_wire()
        del wire["type"]
        self.transcript.append("message", wire)
        self.history.append(chat)
        log.info("%s: %s", peer.name, content, extra={"speaker": peer.name})
        self._send([other for other in self.peers.values() if other is not peer or peer.speaks_extensions],
                   encode(chat))
        if peer.role is Role.MODEL:
            self.floor.on_model_message(peer.name, content)
        elif peer.is_moderator:
            self.floor.on_moderator_message(content, addressed)
        self.publish_floor()

    def _why_withheld(self, peer: Peer, opening: bool) -> tuple[ErrorCode, str] | None:
        if peer.muted:
            return ErrorCode.MUTED, "You are muted by the moderator; your message was not relayed."
        if peer.role is Role.MODEL and not self.floor.may_speak(peer.name, opening=opening):
            if self.floor.paused:
                return ErrorCode.NOT_YOUR_TURN, "The room is paused; your message was kept but not relayed."
            return ErrorCode.NOT_YOUR_TURN, "It is not your turn; your message was kept but not relayed."
        return None

    def _pass_turn(self, peer: Peer, frame: Pass) -> None:
        if peer.role is not Role.MODEL or peer.name not in self.floor.speakers():
            return
        reason = f" ({frame.reason[:200]})" if frame.reason else ""
        self.announce("pass", f"{peer.name} passed its turn{reason}", name=peer.name)
        self.floor.on_model_message(peer.name)
        self.publish_floor()

    def _relay_draft(self, peer: Peer, draft: Draft) -> None:
        if peer.role is not Role.MODEL or peer.name not in self.floor.speakers() or peer.muted:
            return
        self._send([other for other in self.peers.values() if other.wants_stream and other is not peer],
                   encode(Stream(sender=peer.name, content=draft.content, turn=self.floor.turn)))

    def publish_floor(self) -> None:
        """Tell extension-speaking peers who may speak, when that changed."""
        floor = self.floor
        state = FloorState(
            mode=floor.mode.value,
            speakers=floor.speakers(),
            turns_left=max(floor.turns_left, 0),
            paused=floor.paused,
            turn=floor.turn,
        )
        if state == self._last_floor:
            return
        self._last_floor = state
        self.broadcast(state, only_extensions=True)

    def broadcast(self, frame: ServerFrame, *, only_extensions: bool = False,
                  exclude: Peer | None = None) -> None:
        self._send([peer for peer in self.peers.values()
                    if peer is not exclude and (peer.speaks_extensions or not only_extensions)], encode(frame))

    def deliver(self, peer: Peer, frame: ServerFrame) -> None:
        self._send([peer], encode(frame))

    def refuse(self, peer: Peer, code: ErrorCode, sentence: str) -> None:
        """Tell a peer why something was refused, in the form it understands."""
        frame: ServerFrame = (
            Refusal(code=code.value, content=sentence)
            if peer.speaks_extensions
            else Notice(sentence, event="error", code=code.value)
        )
        self.deliver(peer, frame)

    # ------------------------------------------------------------ delivery

    def _send(self, recipients: list[Peer], text: str) -> None:
        """Write one frame to many peers without waiting; cut off the ones too far behind.

        This is websockets' ``broadcast()`` with one step hoisted out of the loop: the hub
        negotiates no extensions and server frames are unmasked, so every recipient gets the same
        bytes, and the frame is serialised once instead of once per peer. Every write happens on
        the event loop between whole frames, so the connection's own frames (pings, close) never
        interleave with these.
        """
        limit = self.settings.max_buffered_bytes
        wire = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
        for peer in recipients:
            if self.peers.get(peer.key) is not peer:
                continue  # already removed, e.g. cut off earlier in this same broadcast
            transport = peer.ws.transport
            if transport is None or peer.ws.protocol.state is not State.OPEN:
                continue
            backlog = transport.get_write_buffer_size()
            if backlog > limit:
                self._cut_off(peer, backlog)
            else:
                transport.write(wire)

    def _cut_off(self, peer: Peer, backlog: int) -> None:
        log.warning("%s has %d KiB unread; disconnecting it", peer.name, backlog // 1024)
        self.remove(peer, "was disconnected for reading too slowly")
        self.close_later(peer, CloseCode.TRY_AGAIN_LATER, "too slow: fell too far behind the room")

    def close_later(self, peer: Peer, code: int, reason: str) -> None:
        """Close a peer's connection from synchronous code; what it is owed is sent first."""
        task = asyncio.create_task(close_peer(peer.ws, code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def flush(self, peer: Peer, timeout: float = 2.0) -> None:
        """Wait (briefly) until a peer has been sent what is buffered for it, e.g. before closing it."""
        deadline = time.monotonic() + timeout
        while (
            peer.ws.transport is not None
            and peer.ws.transport.get_write_buffer_size() > 0
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)

    def _replay_to(self, peer: Peer, last_seq: int | None) -> None:
        """Late joiners get recent history; a reconnecting client gets exactly what it missed.

        Baseline model clients get no replay: they would answer every replayed message.
        """
        if peer.role is Role.MODEL and not peer.speaks_extensions:
            return
        if last_seq is not None:
            missed: Iterable[Chat] = [chat for chat in self.history if chat.seq > last_seq]
            if self.history and self.history[0].seq > last_seq + 1:
                lost = self.history[0].seq - last_seq - 1
                self.deliver(peer, Notice(f"{lost} older messages are no longer held in memory; "
                                          f"they are in the transcript {self.transcript.path}.", event="gap"))
        else:
            missed = list(self.history)[-self.settings.replay:] if self.settings.replay else []
        for chat in missed:
            self.deliver(peer, Chat(**{**chat.__dict__, "replay": True}))

    def announce(self, event: str, sentence: str, *, exclude: Peer | None = None, **fields: str) -> None:
        self.transcript.append("event", {"event": event, "content": sentence, "ts": time.time(), **fields})
        log.info("%s", sentence, extra={"speaker": fields.get("name")})
        self.broadcast(Notice(sentence, event=event), exclude=exclude)

    async def shutdown(self) -> None:
        """Tell everyone the hub is stopping and close every connection."""
        self.announce("shutdown", "The hub is stopping.")
        peers = list(self.peers.values())
        await asyncio.gather(*(self.flush(peer, 1.0) for peer in peers))
        self.peers.clear()  # the shutdown record speaks for everyone; no leave records after it
        await asyncio.gather(
            *(close_peer(peer.ws, CloseCode.GOING_AWAY, "hub stopping") for peer in peers)
        )
        self.transcript.close()


async def close_peer(ws: ServerConnection, code: int, reason: str, timeout: float = 2.0) -> None:
    """Close a connection, dropping it outright if the peer does not answer in time."""
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout)
    except (asyncio.TimeoutError, ConnectionClosed, OSError):
        if ws.transport is not None:
            ws.transport.abort()


def _same_secret(offered: str | None, expected: str) -> bool:
    return offered is not None and hmac.compare_digest(offered.encode(), expected.encode())
