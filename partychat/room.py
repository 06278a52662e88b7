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

from .commands import run_command
from .floor import DEFAULT_TALKATIVENESS, Floor, Mode, TurnEnd
from .guards import REPEAT_WINDOW, Earlier, check_reply
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
    Speed,
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
    first_token_timeout: float = 30.0
    """Seconds a model holding the turn may send nothing at all before it is skipped until it answers."""
    seed: int | None = None
    """Seeds natural mode's draws."""
    guards: bool = True
    """Check every model reply for repeats, emptiness and lines written as someone else."""


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
    drafted: str = ""
    """What was relayed of this peer's reply in ``draft_turn``: what ``/stop`` keeps."""
    heard_turn: int = -1
    """The last turn in which this peer sent anything while holding the floor."""
    talkativeness: float | None = None
    speed: Speed | None = None

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
        self.floor = Floor(mode=settings.mode, max_turns=settings.max_turns, seed=settings.seed)
        self.peers: dict[str, Peer] = {}
        self.history: deque[Chat] = deque(maxlen=max(settings.replay, HISTORY_KEPT))
        self.seq = 0
        self.closing = False
        self._last_floor: FloorState | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._turn_timers: list[asyncio.TimerHandle] = []
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
        if settings.token and not _same_secret(hello.token, settings.token):
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "This hub needs an access token: pass the right one with --token.",
                fatal=True,
            )
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
            talkativeness=hello.talkativeness,
        )
        self.peers[peer.key] = peer
        extended = peer.speaks_extensions
        self.deliver(peer, Notice(
            f"Connected as {peer.name}", event="welcome", protocol=PROTOCOL_VERSION,
            room=self.room_id if extended else None, session=peer.session if extended else None,
        ))
        if peer.role is Role.MODEL:
            self.floor.add_model(peer.name, DEFAULT_TALKATIVENESS if hello.talkativeness is None
                                 else hello.talkativeness)
        if stale is None:
            self.announce("join", f"{peer.name} joined the chat", name=peer.name, role=peer.role.value,
                          exclude=peer)
        self._replay_to(peer, hello.last_seq)
        self.publish_floor()
        return peer

    def remove(self, peer: Peer, reason: str = "left the chat", *, announce: bool = True) -> None:
        if self.peers.get(peer.key) is not peer:
            return
        del self.peers[peer.key]
        held = peer.name in self.floor.speakers() and self.floor.mode is not Mode.FREE
        if peer.role is Role.MODEL:
            self.floor.remove_model(peer.name)
        if announce:
            self.announce("leave", f"{peer.name} {reason}", name=peer.name)
        if held:
            self.announce("skip", f"{peer.name} left while holding the turn; the turn moves on.", name=peer.name)
        self.publish_floor()

    def find(self, name: str) -> Peer | None:
        return self.peers.get(name.casefold().strip())

    def is_present(self, peer: Peer) -> bool:
        return self.peers.get(peer.key) is peer

    # ------------------------------------------------------------ routing

    def receive(self, peer: Peer, frame: Say | Draft | Pass | Command) -> None:
        """Route one validated frame from a peer still in the room."""
        if self.closing or not self.is_present(peer):
            return  # removed (kicked, cut off) or stopping: nothing it sends counts any more
        if peer.role is Role.MODEL:
            self._heard_from(peer, frame)
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
        guarded = self.settings.guards and peer.role is Role.MODEL and not frame.opening
        if not frame.content.strip() and not guarded:
            raise ProtocolError(ErrorCode.EMPTY, "The message is empty.")
        self.post(peer, frame.content, opening=frame.opening, turn=frame.turn, nonce=frame.nonce)

    def _heard_from(self, peer: Peer, frame: Say | Draft | Pass | Command) -> None:
        """A model sent something: it is alive (back in the rotation if it was skipped), and its speed."""
        if peer.name in self.floor.speakers():
            peer.heard_turn = self.floor.turn
        if isinstance(frame, (Say, Pass)) and frame.speed is not None:
            peer.speed = frame.speed
        if self.floor.answered(peer.name):
            self.announce("back", f"{peer.name} answered again and is back in the rotation.", name=peer.name)

    def post(self, peer: Peer, content: str, *, opening: bool = False, turn: int | None = None,
             addressed: str | None = None, nonce: str | None = None) -> None:
        """Accept a chat message: check the floor and the guards, store it, then relay it."""
        if nonce is not None:
            earlier = next((c for c in reversed(self.history) if c.nonce == nonce and c.sender == peer.name), None)
            if earlier is not None:  # a line re-sent after a reconnect: confirm it again, relay it once
                self.deliver(peer, earlier)
                return
        refusal = self._why_withheld(peer, opening, turn)
        if refusal is not None:
            code, sentence = refusal
            self.transcript.withheld(peer.name, peer.role.value, content, code.value)
            log.info("withheld from %s (%s): %s", peer.name, code.value, content)
            self.refuse(peer, code, sentence)
            return
        next_speaker = None
        if self.settings.guards and peer.role is Role.MODEL and not opening and peer.name in self.floor.speakers():
            verdict = check_reply(content, peer.name, self._names(), self._recent())
            if verdict.guard is not None:
                reason = verdict.guard.value
                self.transcript.withheld(peer.name, peer.role.value, verdict.removed, reason)
                log.info("guard %s on %s: %s", reason, peer.name, verdict.removed)
                next_speaker = verdict.impersonated
                if verdict.withheld:
                    self.refuse(peer, ErrorCode.WITHHELD, verdict.reason + " It was kept, not relayed.")
                    self.announce("withheld", verdict.reason, name=peer.name, reason=reason)
                    self.floor.end_turn(peer.name, TurnEnd.WITHHELD, next_speaker=next_speaker)
                    self.publish_floor()
                    return
                self.announce("cut", verdict.reason, name=peer.name, reason=reason)
                content = verdict.content or ""
        self._relay(Chat(sender=peer.name, content=content, seq=self.seq + 1, id=uuid.uuid4().hex[:12],
                         ts=round(time.time(), 3), role=peer.role.value, nonce=nonce), peer)
        if peer.role is Role.MODEL:
            self.floor.end_turn(peer.name, TurnEnd.SPOKE, content, next_speaker=next_speaker)
        elif peer.is_moderator:
            self.floor.on_moderator_message(content, addressed)
        self.publish_floor()

    def _relay(self, chat: Chat, author: Peer) -> None:
        """Store a message (transcript first), then send it to everyone; an extension author gets its echo."""
        self.transcript.message(chat)
        self.seq = chat.seq
        self.history.append(chat)
        log.info("%s: %s", chat.sender, chat.content, extra={"speaker": chat.sender})
        self._send([other for other in self.peers.values() if other is not author or author.speaks_extensions],
                   encode(chat))

    def _names(self) -> list[str]:
        return [peer.name for peer in self.peers.values()] + [chat.sender for chat in self._recent_chats()]

    def _recent_chats(self) -> list[Chat]:
        return list(self.history)[-REPEAT_WINDOW:]

    def _recent(self) -> list[Earlier]:
        return [Earlier(chat.sender, chat.content) for chat in self._recent_chats()]

    def stop_replies(self, by: Peer) -> None:
        """``/stop``: end the replies in progress now, keeping what each had streamed, and move on."""
        speakers = [self.peers.get(name.casefold()) for name in self.floor.speakers()]
        talking = [peer for peer in speakers if peer is not None
                   and (self.floor.mode is not Mode.FREE or peer.draft_turn == self.floor.turn)]
        if not talking:
            raise ProtocolError(ErrorCode.NOTHING_TO_STOP, "No persona is speaking; there is nothing to stop.")
        turn = self.floor.turn
        for peer in talking:
            said = peer.drafted if peer.draft_turn == turn else ""
            if said.strip():
                self.announce("stop", f"{by.name} stopped {peer.name}.", name=peer.name)
                self._relay(Chat(sender=peer.name, content=said, seq=self.seq + 1, id=uuid.uuid4().hex[:12],
                                 ts=round(time.time(), 3), role=peer.role.value, interrupted=True), peer)
            else:
                self.announce("stop", f"{by.name} stopped {peer.name} before it said anything.", name=peer.name)
            self.floor.end_turn(peer.name, TurnEnd.STOPPED, said)
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
        self.floor.end_turn(peer.name, TurnEnd.PASSED)
        self.publish_floor()

    def _relay_draft(self, peer: Peer, draft: Draft) -> None:
        floor = self.floor
        if peer.role is not Role.MODEL or peer.name not in floor.speakers() or peer.muted:
            return
        if peer.draft_turn != floor.turn:
            peer.draft_turn, peer.draft_bytes, peer.drafted = floor.turn, 0, ""
        if not draft.content:
            return  # a sign of life (the first token), nothing to show
        peer.draft_bytes += len(draft.content)
        if peer.draft_bytes > DRAFT_BYTES_PER_TURN:
            return  # a reply that long streams no further; its final message still goes out whole
        peer.drafted += draft.content
        self._send([other for other in self.peers.values() if other.wants_stream and other is not peer],
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
        """Tell extension-speaking peers who may speak, when that changed, and time the new turn.

        When the models have just fallen quiet, one event says why first.
        """
        quiet = self.floor.take_quiet()
        if quiet is not None:
            self.announce("quiet", f"The models are quiet: {quiet.sentence}.", reason=quiet.value)
        state = self.floor_state()
        if state == self._last_floor:
            return
        self._last_floor = state
        self._time_turn(state)
        self.broadcast(state, only_extensions=True)

    def _time_turn(self, state: FloorState) -> None:
        """A model that holds the turn and neither answers nor passes must not stall the room."""
        for timer in self._turn_timers:
            timer.cancel()
        self._turn_timers.clear()
        if len(state.speakers) != 1:
            return
        loop = asyncio.get_running_loop()
        if self.settings.first_token_timeout > 0:
            self._turn_timers.append(loop.call_later(self.settings.first_token_timeout, self._first_token_expired,
                                                     state.speakers[0], state.turn))
        if self.settings.turn_timeout > 0:
            self._turn_timers.append(loop.call_later(self.settings.turn_timeout, self._turn_expired,
                                                     state.speakers[0], state.turn))

    def _first_token_expired(self, holder: str, turn: int) -> None:
        peer = self.find(holder)
        if self.floor.turn != turn or self.floor.speakers() != (holder,) or (peer and peer.heard_turn == turn):
            return
        self.announce("skip", f"{holder} sent nothing for {self.settings.first_token_timeout:g} s; it is skipped "
                              "until it answers again.", name=holder)
        self.floor.skip(holder)
        self.floor.end_turn(holder, TurnEnd.TIMED_OUT)
        self.publish_floor()

    def _turn_expired(self, holder: str, turn: int) -> None:
        if self.floor.turn != turn or self.floor.speakers() != (holder,):
            return
        self.announce("pass", f"{holder} did not answer within {self.settings.turn_timeout:.0f} s; "
                              "its turn passes on", name=holder)
        self.floor.end_turn(holder, TurnEnd.TIMED_OUT)
        self.publish_floor()

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

    def count_refusal(self, peer: Peer) -> bool:
        """Note a bad frame; True once a peer has sent so many in a row that it counts as abuse."""
        peer.refusals_in_a_row += 1
        return peer.refusals_in_a_row > MAX_REFUSALS_IN_A_ROW

    # ------------------------------------------------------------ delivery

    def _send(self, recipients: list[Peer], text: str) -> None:
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
            if not self.is_present(peer):
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
        self.broadcast(Notice(sentence, event=event, reason=fields.get("reason")), exclude=exclude)

    async def shutdown(self) -> None:
        """Tell everyone the hub is stopping and close every connection."""
        self.closing = True
        for timer in self._turn_timers:
            timer.cancel()
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
