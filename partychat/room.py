"""The room: who is in it, what was said, and which frame goes to whom. No network I/O.

Every chat message is stored (transcript first), numbered, and then handed to the room's
``Outlet`` once, with the list of its recipients. The hub implements the outlet over websockets
(serialise once, write to every recipient without waiting on any); the room only decides what is
said and who hears it, so its rules can be read, and tested, apart from the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from .floor import Floor
from .history import ChatHistory
from .members import Members, Peer
from .protocol import (
    PROTOCOL_VERSION,
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
from .settings import RoomSettings
from .transcript import Transcript, load_history

log = logging.getLogger("partychat.hub")

DRAFT_BYTES_PER_TURN = 64 * 1024
"""Streamed text relayed per model turn; past it the partials stop (the final message still goes)."""


class Outlet(Protocol):
    """What the room asks of the network layer. Neither call may wait on a peer."""

    def send(self, peers: Sequence[Peer], text: str) -> None:
        """Write one encoded frame to each of these peers."""

    def dismiss(self, peer: Peer, reason: str) -> None:
        """Close a peer's connection (the room has already removed it), once what it is owed is sent."""


class Room:
    """One conversation: the hub feeds it validated frames, and it answers through its outlet.

    Membership lives in ``Members``, the numbered messages in ``ChatHistory`` and the turn-taking
    rules in ``Floor``; the room ties them together and decides what every peer hears.
    """

    def __init__(self, settings: RoomSettings, transcript: Transcript, outlet: Outlet,
                 resume: Path | None = None) -> None:
        self.settings = settings
        self.transcript = transcript
        self.outlet = outlet
        self.floor = Floor(mode=settings.mode, max_turns=settings.max_turns)
        self.members = Members(settings)
        self.history = ChatHistory(settings.replay)
        self.closing = False
        self._last_floor: FloorState | None = None
        self._turn_timer: asyncio.TimerHandle | None = None
        room_id = None
        if resume is not None:
            earlier = load_history(resume)
            room_id = earlier.room_id
            self.history.extend(earlier.messages)
            log.info("Resumed %d messages from %s; the next sequence number is %d",
                     len(earlier.messages), resume, self.history.seq + 1)
        self.room_id = room_id or uuid.uuid4().hex[:12]
        """Names this conversation; it survives --resume, so clients know their sequence numbers still hold."""
        transcript.start(self.room_id)

    # ------------------------------------------------------------ membership

    def admit(self, hello: Hello, link: Any) -> Peer:
        """Check a registration against the room's rules and add the peer, or raise why not.

        ``link`` is the network layer's handle on the connection, handed back to it with every send.
        """
        if self.closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "The hub is stopping; try again later.", fatal=True)
        stale = self.members.vet(hello)
        if stale is not None:
            # The same client again, after a connection the hub has not noticed is dead yet.
            self.remove(stale, "reconnected", announce=False)
            self.outlet.dismiss(stale, "replaced by a new connection")
        peer = self.members.enrol(hello, link)
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
        self.publish_floor()
        return peer

    def remove(self, peer: Peer, reason: str = "left the chat", *, announce: bool = True) -> None:
        if not self.members.discharge(peer):
            return
        if peer.role is Role.MODEL:
            self.floor.remove_model(peer.name)
        if announce:
            self.announce("leave", f"{peer.name} {reason}", name=peer.name)
        self.publish_floor()

    def dismiss(self, peer: Peer, reason: str) -> None:
        """Close a removed peer's connection, after what it is owed has been sent."""
        self.outlet.dismiss(peer, reason)

    def find(self, name: str) -> Peer | None:
        return self.members.find(name)

    def is_present(self, peer: Peer) -> bool:
        return self.members.is_present(peer)

    def hears(self, peer: Peer) -> bool:
        """Whether frames from a peer still count: not once it was removed (kicked, cut off) or the hub stops."""
        return not self.closing and self.is_present(peer)

    def meter(self, peer: Peer) -> None:
        """Charge a message or command to a peer's rate limit, or raise why it was dropped."""
        self.members.meter(peer)

    def count_refusal(self, peer: Peer) -> bool:
        """Note a bad frame; True once a peer has sent so many in a row that it counts as abuse."""
        return self.members.count_refusal(peer)

    def _audience(self) -> list[Peer]:
        """Everyone a room-wide frame goes to."""
        return list(self.members)

    # ------------------------------------------------------------ routing and history

    def receive(self, peer: Peer, frame: Say | Draft | Pass) -> None:
        """Route one validated frame from a peer. Commands go to ``commands.run_command`` instead."""
        if not self.hears(peer):
            return
        if isinstance(frame, Draft):
            self._relay_draft(peer, frame)
            return
        if isinstance(frame, Pass):
            self._pass_turn(peer, frame)
            return
        self.meter(peer)
        self.post(peer, frame.content, opening=frame.opening, turn=frame.turn)

    def post(self, peer: Peer, content: str, *, opening: bool = False, turn: int | None = None,
             addressed: str | None = None) -> None:
        """Accept a chat message: check it, store it, then relay it."""
        refusal = self._why_withheld(peer, content, opening, turn)
        if refusal is not None:
            code, sentence = refusal
            self.transcript.withheld(peer.name, peer.role.value, content, code.value)
            log.info("withheld from %s (%s): %s", peer.name, code.value, content)
            self.refuse(peer, code, sentence)
            return
        chat = self.history.draft(peer.name, content, peer.role.value)
        self.transcript.message(chat)
        self.history.keep(chat)
        log.info("%s: %s", peer.name, content, extra={"speaker": peer.name})
        self._send([other for other in self._audience() if other is not peer or peer.speaks_extensions],
                   encode(chat))
        if peer.role is Role.MODEL:
            self.floor.on_model_message(peer.name, content)
        elif peer.is_moderator:
            self.floor.on_moderator_message(content, addressed)
        self.publish_floor()

    def _why_withheld(self, peer: Peer, content: str, opening: bool,
                      turn: int | None) -> tuple[ErrorCode, str] | None:
        """Why a message must be kept out of the room, or None to relay it. Every check of a reply goes here."""
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

    def _relay_draft(self, peer: Peer, draft: Draft) -> None:
        floor = self.floor
        if peer.role is not Role.MODEL or peer.name not in floor.speakers() or peer.muted:
            return
        if peer.draft_turn != floor.turn:
            peer.draft_turn, peer.draft_bytes = floor.turn, 0
        peer.draft_bytes += len(draft.content)
        if peer.draft_bytes > DRAFT_BYTES_PER_TURN:
            return  # a reply that long streams no further; its final message still goes out whole
        self._send([other for other in self._audience() if other.wants_stream and other is not peer],
                   encode(Stream(sender=peer.name, content=draft.content, turn=floor.turn)))

    def _replay_to(self, peer: Peer, last_seq: int | None) -> None:
        """Late joiners get recent history; a reconnecting client gets exactly what it missed.

        Baseline model clients get no replay: they would answer every replayed message.
        """
        if peer.role is Role.MODEL and not peer.speaks_extensions:
            return
        if last_seq is not None and last_seq > self.history.seq:
            last_seq = None  # numbers from another conversation (a hub restarted without --resume)
        if last_seq is not None:
            missed, lost = self.history.since(last_seq)
            if lost:
                self.deliver(peer, Notice(f"{lost} older messages are no longer held in memory; "
                                          f"they are in the transcript {self.transcript.path}.", event="gap"))
        else:
            missed = self.history.recent(self.settings.replay)
        for chat in missed:
            self.deliver(peer, replace(chat, replay=True))

    # ------------------------------------------------------------ the floor and the turn timer

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

    def _pass_turn(self, peer: Peer, frame: Pass) -> None:
        stale = frame.turn is not None and frame.turn != self.floor.turn
        if peer.role is not Role.MODEL or peer.name not in self.floor.speakers() or stale:
            return
        reason = f" ({frame.reason[:200]})" if frame.reason else ""
        self.announce("pass", f"{peer.name} passed its turn{reason}", name=peer.name)
        self.floor.on_model_message(peer.name)
        self.publish_floor()

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

    # ------------------------------------------------------------ what goes to whom

    def broadcast(self, frame: ServerFrame, *, only_extensions: bool = False,
                  exclude: Peer | None = None) -> None:
        self._send([peer for peer in self._audience()
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

    def announce(self, event: str, sentence: str, *, exclude: Peer | None = None, **fields: str) -> None:
        self.transcript.event(event, sentence, **fields)
        log.info("%s", sentence, extra={"speaker": fields.get("name")})
        self.broadcast(Notice(sentence, event=event), exclude=exclude)

    def _send(self, recipients: Iterable[Peer], text: str) -> None:
        """Hand one encoded frame to the outlet for the recipients still in the room."""
        present = [peer for peer in recipients if self.is_present(peer)]
        if present:
            self.outlet.send(present, text)

    def stop(self) -> list[Peer]:
        """Say the hub is stopping and empty the room; returns the peers whose connections must close."""
        self.closing = True
        if self._turn_timer is not None:
            self._turn_timer.cancel()
        self.announce("shutdown", "The hub is stopping.")
        return self.members.clear()  # the shutdown record speaks for everyone; no leave records after it

    def close(self) -> None:
        """Write the transcript out; call after the peers' connections are closed."""
        self.transcript.close()
