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
import secrets
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

from .audience import Audience, Spectator
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
    Presence,
    ProtocolError,
    Refusal,
    Role,
    Say,
    ServerFrame,
    Spectate,
    Stream,
    encode,
)
from .transcript import Transcript, load_history

log = logging.getLogger("partychat.hub")

HISTORY_KEPT = 1000
"""Recent messages held in memory for replay and for clients that reconnect."""
DRAFT_BYTES_PER_TURN = 64 * 1024
"""Streamed text relayed per model turn; past it the partials stop (the final message still goes)."""
MAX_REFUSALS_IN_A_ROW = 50
SPECTATOR_COUNT_PERIOD = 1.0
"""Seconds between presence frames that only say how many are watching: a join storm costs a few frames, not n²."""
"""Bad frames a peer may send in a row before the hub treats it as abuse and closes it."""


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
    turn_timeout: float = 180.0
    """Seconds a model may hold the turn without answering before the hub passes it on."""
    max_spectators: int = 1000


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
    ws: ServerConnection
    name: str
    role: Role
    protocol: int | None
    wants_stream: bool
    is_moderator: bool
    limiter: RateLimiter
    session: str
    muted: bool = False
    refusals_in_a_row: int = 0
    draft_bytes: int = 0
    draft_turn: int = -1

    @property
    def speaks_extensions(self) -> bool:
        return self.protocol is not None

    def __post_init__(self) -> None:
        self.key = self.name.casefold()
        """Names are unique regardless of case; the room is keyed by this."""


class Room:
    def __init__(self, settings: RoomSettings, transcript: Transcript, resume: Path | None = None) -> None:
        self.settings = settings
        self.transcript = transcript
        self.floor = Floor(mode=settings.mode, max_turns=settings.max_turns)
        self.peers: dict[str, Peer] = {}
        self.audience = Audience(settings.max_spectators)
        self._last_presence: Presence | None = None
        self._count_timer: asyncio.TimerHandle | None = None
        self.history: deque[Chat] = deque(maxlen=max(settings.replay, HISTORY_KEPT))
        self.seq = 0
        self.closing = False
        self._last_floor: FloorState | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._turn_timer: asyncio.TimerHandle | None = None
        room_id = None
        if resume is not None:
            earlier = load_history(resume)
            room_id = earlier.room_id
            self.history.extend(earlier.messages)
            self.seq = max((chat.seq for chat in earlier.messages), default=0)
            log.info("Resumed %d messages from %s; the next sequence number is %d",
                     len(earlier.messages), resume, self.seq + 1)
        self.room_id = room_id or uuid.uuid4().hex[:12]
        """Names this conversation; it survives --resume, so clients know their sequence numbers still hold."""
        transcript.start(self.room_id)

    # ------------------------------------------------------------ membership

    def admit(self, ws: ServerConnection, hello: Hello) -> Peer:
        """Check a registration against the room's rules and add the peer, or raise why not."""
        settings = self.settings
        if self.closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "The hub is stopping; try again later.", fatal=True)
        self._check_token(hello.token)
        stale = self.peers.get(hello.name.casefold())
        if stale is not None:
            if not (hello.session and _same_secret(hello.session, stale.session)):
                raise ProtocolError(
                    ErrorCode.NAME_TAKEN,
                    f"The name {hello.name!r} is already taken in this room; choose another.",
                    fatal=True,
                )
            # The same client again, after a connection the hub has not noticed is dead yet.
            self.remove(stale, "reconnected", announce=False)
            self.close_later(stale, CloseCode.POLICY_VIOLATION, "replaced by a new connection")
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
            wants_stream=hello.stream and hello.protocol is not None and hello.role is Role.HUMAN,
            is_moderator=is_moderator,
            limiter=RateLimiter(settings.rate_per_second, settings.rate_burst),
            session=secrets.token_urlsafe(16),
        )
        self.peers[peer.key] = peer
        extended = peer.speaks_extensions
        self.deliver(peer, Notice(
            f"Connected as {peer.name}", event="welcome", protocol=PROTOCOL_VERSION,
            room=self.room_id if extended else None, session=peer.session if extended else None,
        ))
        if peer.role is Role.MODEL:
            self.floor.add_model(peer.name)
        if stale is None:
            self.announce("join", f"{peer.name} joined the chat", name=peer.name, role=peer.role.value,
                          exclude=peer)
        self._replay_to(peer, hello.last_seq)
        if peer.wants_stream:
            self.deliver(peer, self.floor_state())  # the room as it stands; presence follows below
        self.publish_floor()
        self.publish_presence()
        return peer

    def _check_token(self, offered: str | None) -> None:
        token = self.settings.token
        if token and not _same_secret(offered, token):
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "This hub needs an access token: pass the right one with --token.",
                fatal=True,
            )

    def watch(self, ws: ServerConnection, spectate: Spectate) -> Spectator:
        """Seat a spectator: welcome it, show it the room, and announce nothing to anyone."""
        if self.closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "The hub is stopping; try again later.", fatal=True)
        self._check_token(spectate.token)
        spectator = self.audience.seat(ws)
        self.deliver(spectator, Notice("Watching the room", event="welcome", protocol=PROTOCOL_VERSION,
                                       room=self.room_id))
        self._replay_to(spectator, spectate.last_seq)
        self.deliver(spectator, self.floor_state())
        self.deliver(spectator, self._presence())
        self._count_spectators_soon()
        return spectator

    def unwatch(self, spectator: Spectator) -> None:
        if self.audience.leave(spectator):
            self._count_spectators_soon()


    def remove(self, peer: Peer, reason: str = "left the chat", *, announce: bool = True) -> None:
        if self.peers.get(peer.key) is not peer:
            return
        del self.peers[peer.key]
        if peer.role is Role.MODEL:
            self.floor.remove_model(peer.name)
        if announce:
            self.announce("leave", f"{peer.name} {reason}", name=peer.name)
        self.publish_floor()
        self.publish_presence()

    def find(self, name: str) -> Peer | None:
        return self.peers.get(name.casefold().strip())

    def is_present(self, peer: Peer) -> bool:
        return self.peers.get(peer.key) is peer

    # ------------------------------------------------------------ routing

    def receive(self, peer: Peer, frame: Say | Draft | Pass | Command) -> None:
        """Route one validated frame from a peer still in the room."""
        if self.closing or not self.is_present(peer):
            return  # removed (kicked, cut off) or stopping: nothing it sends counts any more
        if isinstance(frame, Draft):
            self._relay_draft(peer, frame)
            return
        if isinstance(frame, Pass):
            self._pass_turn(peer, frame)
            return
        if not peer.limiter.allow():
            raise ProtocolError(ErrorCode.RATE_LIMITED, "You are sending too fast; that frame was dropped. Slow down.")
        peer.refusals_in_a_row = 0
        if isinstance(frame, Command):
            run_command(self, peer, frame)
            return
        self.post(peer, frame.content, opening=frame.opening, turn=frame.turn)

    def post(self, peer: Peer, content: str, *, opening: bool = False, turn: int | None = None,
             addressed: str | None = None) -> None:
        """Accept a chat message: check the floor, store it, then relay it."""
        refusal = self._why_withheld(peer, opening, turn)
        if refusal is not None:
            code, sentence = refusal
            self.transcript.withheld(peer.name, peer.role.value, content, code.value)
            log.info("withheld from %s (%s): %s", peer.name, code.value, content)
            self.refuse(peer, code, sentence)
            return
        chat = Chat(
            sender=peer.name,
            content=content,
            seq=self.seq + 1,
            id=uuid.uuid4().hex[:12],
            ts=round(time.time(), 3),
            role=peer.role.value,
        )
        self.transcript.message(chat)
        self.seq = chat.seq
        self.history.append(chat)
        log.info("%s: %s", peer.name, content, extra={"speaker": peer.name})
        self._send([other for other in self._listeners() if other is not peer or peer.speaks_extensions],
                   encode(chat))
        if peer.role is Role.MODEL:
            self.floor.on_model_message(peer.name, content)
        elif peer.is_moderator:
            self.floor.on_moderator_message(content, addressed)
        self.publish_floor()

    def _why_withheld(self, peer: Peer, opening: bool, turn: int | None) -> tuple[ErrorCode, str] | None:
        if peer.muted:
            return ErrorCode.MUTED, "You are muted by the moderator; your message was kept but not relayed."
        if peer.role is not Role.MODEL:
            return None
        if self.floor.paused:
            return ErrorCode.NOT_YOUR_TURN, "The room is paused; your message was kept but not relayed."
        if not self.floor.may_speak(peer.name, opening=opening):
            return ErrorCode.NOT_YOUR_TURN, "It is not your turn; your message was kept but not relayed."
        if turn is not None and turn != self.floor.turn and not opening:
            return ErrorCode.NOT_YOUR_TURN, "That reply was for an earlier turn; it was kept but not relayed."
        return None

    def _pass_turn(self, peer: Peer, frame: Pass) -> None:
        stale = frame.turn is not None and frame.turn != self.floor.turn
        if peer.role is not Role.MODEL or peer.name not in self.floor.speakers() or stale:
            return
        reason = f" ({frame.reason[:200]})" if frame.reason else ""
        self.announce("pass", f"{peer.name} passed its turn{reason}", name=peer.name)
        self.floor.on_model_message(peer.name)
        self.publish_floor()

    def _relay_draft(self, peer: Peer, draft: Draft) -> None:
        floor = self.floor
        if peer.role is not Role.MODEL or peer.name not in floor.speakers() or peer.muted:
            return
        if peer.draft_turn != floor.turn:
            peer.draft_turn, peer.draft_bytes = floor.turn, 0
        peer.draft_bytes += len(draft.content)
        if peer.draft_bytes > DRAFT_BYTES_PER_TURN:
            return  # a reply that long streams no further; its final message still goes out whole
        self._send([other for other in self._listeners() if other.wants_stream and other is not peer],
                   encode(Stream(sender=peer.name, content=draft.content, turn=floor.turn)))

    def floor_state(self) -> FloorState:
        floor = self.floor
        return FloorState(
            mode=floor.mode.value,
            speakers=floor.speakers(),
            turns_left=max(floor.turns_left, 0),
            paused=floor.paused,
            turn=floor.turn,
        )

    def publish_floor(self) -> None:
        """Tell extension-speaking peers who may speak, when that changed, and time the new turn."""
        state = self.floor_state()
        if state == self._last_floor:
            return
        self._last_floor = state
        self._time_turn(state)
        self.broadcast(state, only_extensions=True)

    def _time_turn(self, state: FloorState) -> None:
        """A model that holds the turn and neither answers nor passes must not stall the room."""
        if self._turn_timer is not None:
            self._turn_timer.cancel()
            self._turn_timer = None
        if len(state.speakers) == 1 and self.settings.turn_timeout > 0:
            self._turn_timer = asyncio.get_running_loop().call_later(
                self.settings.turn_timeout, self._turn_expired, state.speakers[0], state.turn
            )

    def _turn_expired(self, holder: str, turn: int) -> None:
        self._turn_timer = None
        if self.floor.turn != turn or self.floor.speakers() != (holder,):
            return
        self.announce("pass", f"{holder} did not answer within {self.settings.turn_timeout:.0f} s; "
                              "its turn passes on", name=holder)
        self.floor.on_model_message(holder)
        self.publish_floor()

    def _listeners(self) -> list[Peer | Spectator]:
        """Everyone a room-wide frame goes to: the participants, then the spectators."""
        return [*self.peers.values(), *self.audience]

    def broadcast(self, frame: ServerFrame, *, only_extensions: bool = False,
                  exclude: Peer | None = None) -> None:
        self._send([peer for peer in self._listeners()
                    if peer is not exclude and (peer.speaks_extensions or not only_extensions)], encode(frame))

    def deliver(self, peer: Peer | Spectator, frame: ServerFrame) -> None:
        self._send([peer], encode(frame))

    def _presence(self) -> Presence:
        return Presence(
            participants=tuple(
                {"name": p.name, "role": p.role.value, "moderator": p.is_moderator, "muted": p.muted}
                for p in self.peers.values()
            ),
            spectators=len(self.audience),
        )

    def publish_presence(self) -> None:
        """Tell the pages (spectators and streaming humans) who is here, when that changed."""
        presence = self._presence()
        if presence == self._last_presence:
            return
        self._last_presence = presence
        if self._count_timer is not None:
            self._count_timer.cancel()
            self._count_timer = None
        self._send([listener for listener in self._listeners() if listener.wants_stream], encode(presence))

    def _count_spectators_soon(self) -> None:
        """A spectator came or went: say the new count once, a moment later, for every change meanwhile."""
        if self._count_timer is None and not self.closing:
            self._count_timer = asyncio.get_running_loop().call_later(SPECTATOR_COUNT_PERIOD, self._count_now)

    def _count_now(self) -> None:
        self._count_timer = None
        self.publish_presence()

    def refuse(self, peer: Peer | Spectator, code: ErrorCode, sentence: str) -> None:
        """Tell a peer why something was refused, in the form it understands."""
        frame: ServerFrame = (
            Refusal(code=code.value, content=sentence)
            if peer.speaks_extensions
            else Notice(sentence, event="error", code=code.value)
        )
        self.deliver(peer, frame)

    def count_refusal(self, peer: Peer | Spectator) -> bool:
        """Note a bad frame; True once a peer has sent so many in a row that it counts as abuse."""
        peer.refusals_in_a_row += 1
        return peer.refusals_in_a_row > MAX_REFUSALS_IN_A_ROW

    # ------------------------------------------------------------ delivery

    def _send(self, recipients: list[Peer | Spectator], text: str) -> None:
        """Write one frame to many peers without waiting; cut off the ones too far behind.

        This is websockets' ``broadcast()`` with one step hoisted out of the loop: server frames are
        unmasked and the hub negotiates no extensions (it serves with compression off), so every
        recipient gets the same bytes and the frame is serialised once instead of once per peer.
        Every write happens on the event loop between whole frames, so the connection's own frames
        (pings, close) never interleave with these.
        """
        limit = self.settings.max_buffered_bytes
        wire = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
        too_slow = []
        for peer in recipients:
            if not (peer in self.audience if isinstance(peer, Spectator) else self.is_present(peer)):
                continue
            transport, protocol = peer.ws.transport, peer.ws.protocol
            if transport is None or protocol.state is not State.OPEN:
                continue
            backlog = transport.get_write_buffer_size()
            if backlog > limit:
                too_slow.append((peer, backlog))
            elif protocol.extensions:
                broadcast([peer.ws], text)  # a peer with an extension needs its own encoding
            else:
                transport.write(wire)
        # Removing announces a leave, which sends frames itself: only once this frame has gone to all.
        for peer, backlog in too_slow:
            self._cut_off(peer, backlog)

    def _cut_off(self, peer: Peer | Spectator, backlog: int) -> None:
        log.warning("%s has %d KiB unread; disconnecting it", peer.name, backlog // 1024)
        if isinstance(peer, Spectator):
            self.unwatch(peer)
        else:
            self.remove(peer, "was disconnected for reading too slowly")
        self.close_later(peer, CloseCode.TRY_AGAIN_LATER, "too slow: fell too far behind the room")

    def close_later(self, peer: Peer | Spectator, code: int, reason: str) -> None:
        """Close a peer's connection from synchronous code; what it is owed is sent first."""
        task = asyncio.create_task(close_peer(peer.ws, code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def flush(self, peer: Peer | Spectator, timeout: float = 2.0) -> None:
        """Wait (briefly) until a peer has been sent what is buffered for it, e.g. before closing it."""
        deadline = time.monotonic() + timeout
        while (
            peer.ws.transport is not None
            and peer.ws.transport.get_write_buffer_size() > 0
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)

    def _replay_to(self, peer: Peer | Spectator, last_seq: int | None) -> None:
        """Late joiners get recent history; a reconnecting client gets exactly what it missed.

        Baseline model clients get no replay: they would answer every replayed message.
        """
        if isinstance(peer, Peer) and peer.role is Role.MODEL and not peer.speaks_extensions:
            return
        if last_seq is not None and last_seq > self.seq:
            last_seq = None  # numbers from another conversation (a hub restarted without --resume)
        if last_seq is not None:
            missed: Iterable[Chat] = [chat for chat in self.history if chat.seq > last_seq]
            if self.history and self.history[0].seq > last_seq + 1:
                lost = self.history[0].seq - last_seq - 1
                self.deliver(peer, Notice(f"{lost} older messages are no longer held in memory; "
                                          f"they are in the transcript {self.transcript.path}.", event="gap"))
        else:
            missed = list(self.history)[-self.settings.replay:] if self.settings.replay else []
        for chat in missed:
            self.deliver(peer, replace(chat, replay=True))

    def announce(self, event: str, sentence: str, *, exclude: Peer | None = None, **fields: str) -> None:
        self.transcript.event(event, sentence, **fields)
        log.info("%s", sentence, extra={"speaker": fields.get("name")})
        self.broadcast(Notice(sentence, event=event), exclude=exclude)

    async def shutdown(self) -> None:
        """Tell everyone the hub is stopping and close every connection."""
        self.closing = True
        for timer in (self._turn_timer, self._count_timer):
            if timer is not None:
                timer.cancel()
        self.announce("shutdown", "The hub is stopping.")
        peers = [*self.peers.values(), *self.audience]
        await asyncio.gather(*(self.flush(peer, 1.0) for peer in peers))
        self.peers.clear()  # the shutdown record speaks for everyone; no leave records after it
        self.audience.clear()
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
