"""The room: who is in it, what was said, and which frame goes to whom. No network I/O.

Every chat message is stored (transcript first), numbered, and then handed to the room's
``Outlet`` once, with the list of its recipients. The hub implements the outlet over websockets
(serialise once, write to every recipient without waiting on any); the room only decides what is
said and who hears it, so its rules can be read, and tested, apart from the sockets. The turn
timers go through the outlet too, and the transcript is any ``record.Recording``: the room needs
no event loop and no file.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from ..guards import REPEAT_WINDOW, Earlier, Verdict, check_reply
from ..protocol import (
    PROTOCOL_VERSION,
    Chat,
    Discard,
    ErrorCode,
    FloorState,
    Hello,
    Notice,
    Partial,
    Pass,
    Presence,
    ProtocolError,
    Redo,
    Refusal,
    RelayedPartial,
    Role,
    Say,
    ServerFrame,
    Spectate,
    Withdrawn,
    encode,
    speaker_colour_index,
)
from .floor import DEFAULT_TALKATIVENESS, Floor, Mode, TurnEnd
from .members import Members, Peer
from .messages import RecentMessages
from .recipients import EVERYONE, NO_PERSONA, Recipients, Sight, Stage, sight, trace_sentence
from .record import Recording, SavedRoom
from .settings import RoomSettings
from .spectators import Listener, Spectator, Spectators

log = logging.getLogger("partychat.hub")

DRAFT_BYTES_PER_TURN = 64 * 1024
"""Streamed text relayed per model turn; past it the partials stop (the final message still goes)."""
SPECTATOR_COUNT_PERIOD = 1.0
"""Seconds between presence frames that only change the spectator count, so a join storm costs a few frames, not n²."""
TAKEN_BACK_BECAUSE = {
    "repeat": "it repeated a recent message",
    "empty": "it had no words",
    "impersonation": "it was written as someone else",
}
"""Why a model took an attempt back (``Discard``), by the guard's code, as the room is told."""


class Timer(Protocol):
    def cancel(self) -> None:
        """The call has not happened and now never will (or it has, and this does nothing)."""


class Outlet(Protocol):
    """What the room asks of the network layer. No call may wait on a peer."""

    def send(self, peers: Sequence[Listener], text: str) -> None:
        """Write one encoded frame to each of these peers."""

    def dismiss(self, peer: Listener, reason: str) -> None:
        """Close a peer's connection (the room has already removed it), once what it is owed is sent."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` in ``delay`` seconds, between two of the room's other calls, unless cancelled."""


class Room:
    """One conversation: the hub feeds it validated frames, and it answers through its outlet.

    Membership lives in ``Members``, spectators in ``Spectators``, the numbered messages in
    ``RecentMessages`` and the turn-taking rules in ``Floor``; the room ties them together and decides
    what every peer hears.
    """

    def __init__(self, settings: RoomSettings, transcript: Recording, outlet: Outlet,
                 earlier: SavedRoom | None = None) -> None:
        """``earlier`` is what a resumed transcript holds (``--resume``): the room carries on from it."""
        self.settings = settings
        self.transcript = transcript
        self.outlet = outlet
        self.floor = Floor(mode=settings.mode, max_turns=settings.max_turns, seed=settings.seed)
        self.members = Members(settings)
        self.spectators = Spectators(settings.max_spectators)
        self.messages = RecentMessages(settings.replay)
        self.stage = Stage()
        self._private_reply: tuple[str, int] | None = None
        """(persona, turn) whose reply stays private: the turn a ``/whisper!`` gave it."""
        self.closing = False
        self._last_floor: FloorState | None = None
        self._last_floor_text = ""
        self._turn_timers: list[Timer] = []
        self._last_presence: Presence | None = None
        self._count_timer: Timer | None = None
        room_id = None
        if earlier is not None:
            room_id = earlier.room_id
            self.messages.extend(earlier.messages)
            if earlier.stage is not None:
                self.stage.restore(*earlier.stage)
            log.info("Resumed %d messages; the next sequence number is %d", len(earlier.messages),
                     self.messages.seq + 1)
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
        newcomer = False
        if peer.role is Role.MODEL:
            newcomer = not self.stage.knows(peer.name)
            if self.stage.arrive(peer.name, offstage=hello.offstage):
                self._record_stage()
            newcomer = newcomer and self.stage.running  # a room that runs scenes replays a newcomer nothing
            talkativeness = DEFAULT_TALKATIVENESS if hello.talkativeness is None else hello.talkativeness
            if self.stage.is_on(peer.name):
                self.floor.add_model(peer.name, talkativeness)
            else:
                self.floor.talkativeness[peer.name] = talkativeness  # kept for when it enters
        if stale is None:
            self.announce("join", f"{peer.name} joined the chat", name=peer.name, role=peer.role.value,
                          exclude=peer, recipients=self._about(peer.name))
        if not newcomer:
            self._replay_to(peer, hello.last_seq)
        if peer.wants_stream:
            self.deliver(peer, self.floor_state())  # the room as it stands; presence follows below
        self.publish_floor()
        self.publish_presence()
        return peer

    def remove(self, peer: Peer, reason: str = "left the chat", *, announce: bool = True) -> None:
        if not self.members.discharge(peer):
            return
        held = peer.name in self.floor.speakers() and self.floor.mode is not Mode.FREE
        if peer.role is Role.MODEL:
            self.floor.remove_model(peer.name)
        about = self._about(peer.name)
        if announce:
            self.announce("leave", f"{peer.name} {reason}", name=peer.name, recipients=about)
        if held:
            self.announce("skip", f"{peer.name} left while holding the turn; the turn moves on.", name=peer.name,
                          recipients=self._reply_recipients(peer.name))
        self.publish_floor()
        self.publish_presence()

    def watch(self, spectate: Spectate, link: Any) -> Spectator:
        """Seat a spectator: welcome it and show it the room, announcing nothing to anyone."""
        if self.closing:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "The hub is stopping; try again later.", fatal=True)
        self.members.check_token(spectate.token)
        spectator = self.spectators.seat(link)
        self.deliver(spectator, Notice("Watching the room", event="welcome", protocol=PROTOCOL_VERSION,
                                       room=self.room_id))
        self._replay_to(spectator, spectate.last_seq)
        state = self.floor_state()  # the same for every spectator of a join storm: encoded once
        self._send([spectator], self._last_floor_text if state == self._last_floor else encode(state))
        self.deliver(spectator, self._presence())
        self._count_spectators_soon()
        return spectator

    def unwatch(self, spectator: Spectator) -> None:
        if self.spectators.leave(spectator):
            self._count_spectators_soon()

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

    def count_refusal(self, peer: Listener) -> bool:
        """Note a bad frame; True once a peer has sent so many in a row that it counts as abuse."""
        return self.members.count_refusal(peer)

    def _everyone(self) -> list[Listener]:
        """Everyone a room-wide frame goes to: the participants, then the spectators."""
        return [*self.members, *self.spectators]

    # ------------------------------------------------------------ routing and history

    def receive(self, peer: Peer, frame: Say | Partial | Pass | Discard) -> None:
        """Route one validated frame from a peer. Commands go to ``commands.run_command`` instead."""
        if not self.hears(peer):
            return
        if peer.role is Role.MODEL:
            self._heard_from(peer, frame)
        if isinstance(frame, Partial):
            self._relay_partial(peer, frame)
            return
        if isinstance(frame, Discard):
            self._take_back(peer, frame)
            return
        if isinstance(frame, Pass):
            if frame.replaces is not None:
                self._decline_redo(peer, frame)
            else:
                self._pass_turn(peer, frame)
            return
        self.meter(peer)
        if frame.replaces is not None:
            self._replace(peer, frame)
            return
        guarded = self.settings.guards and peer.role is Role.MODEL and not frame.opening
        if not frame.content.strip() and not guarded:
            raise ProtocolError(ErrorCode.EMPTY, "The message is empty.")
        self.post(peer, frame.content, opening=frame.opening, turn=frame.turn, nonce=frame.nonce)

    def _heard_from(self, peer: Peer, frame: Say | Partial | Pass | Discard) -> None:
        """A model sent something: it is alive (back in the rotation if it was skipped), and its speed."""
        if peer.name in self.floor.speakers():
            peer.heard_turn = self.floor.turn
        if isinstance(frame, (Say, Pass)) and frame.speed is not None:
            peer.speed = frame.speed
        if self.floor.answered(peer.name):
            self.announce("back", f"{peer.name} answered again and is back in the rotation.", name=peer.name,
                          recipients=self._about(peer.name))

    def post(self, peer: Peer, content: str, *, opening: bool = False, turn: int | None = None,
             addressed: str | None = None, nonce: str | None = None, recipients: Recipients | None = None) -> None:
        """Accept a chat message: check it (floor, then guards), store it, then relay it.

        ``recipients`` is for the moderator's commands (a whisper, an exit line); otherwise a
        message goes to whoever is on stage, and a persona's reply to a ``/whisper!`` stays private.
        """
        if nonce is not None:
            earlier = self.messages.with_nonce(peer.name, nonce)
            if earlier is not None:  # a line re-sent after a reconnect: confirm it again, relay it once
                self.deliver(peer, earlier)
                return
        refusal = self._why_withheld(peer, content, opening, turn)
        if refusal is not None:
            code, sentence = refusal
            self.transcript.withheld(peer.name, peer.role.value, content, code.value)
            log.info("withheld from %s (%s): %s", peer.name, code.value, content)
            self.refuse(peer, code, sentence)
            return
        verdict = Verdict(content)
        if self.settings.guards and peer.role is Role.MODEL and not opening:
            verdict = self._guard(peer, content)
            if verdict.content is None:
                return
            content = verdict.content
        next_speaker = verdict.impersonated
        if recipients is None:
            recipients = self._reply_recipients(peer.name) if peer.role is Role.MODEL else self.stage.public()
        self._relay(replace(self.messages.next_message(peer.name, content, peer.role.value), nonce=nonce,
                            recipients=recipients.personas, whisper=recipients.whisper), peer)
        if peer.role is Role.MODEL:
            self.floor.end_turn(peer.name, TurnEnd.SPOKE, content, next_speaker=next_speaker)
        elif peer.is_moderator:
            self.floor.on_moderator_message(content, addressed)
        self.publish_floor()

    def _guard(self, peer: Peer, content: str, replacing: Chat | None = None) -> Verdict:
        """Check a model's reply; keep what a guard holds back in the transcript and say why.

        A withheld reply ends the turn here; the verdict's ``content`` is then None. A new version
        of an earlier message (``replacing``) is held no turn, and must not repeat the old one either.
        """
        recent = self._recent()
        if replacing is not None and replacing.id not in {chat.id for chat in self.messages.recent(REPEAT_WINDOW)}:
            recent = [*recent[1 - REPEAT_WINDOW:], Earlier(replacing.sender, replacing.content)]
        verdict = check_reply(content, peer.name, self._names(), recent)
        if verdict.guard is None:
            return verdict
        reason = verdict.guard.value
        self.transcript.withheld(peer.name, peer.role.value, verdict.removed, reason)
        log.info("guard %s on %s: %s", reason, peer.name, verdict.removed)
        recipients = self._reply_recipients(peer.name)
        if not verdict.withheld:
            self.announce("cut", verdict.reason, name=peer.name, reason=reason, recipients=recipients)
            return verdict
        self.refuse(peer, ErrorCode.WITHHELD, verdict.reason + " It was kept, not relayed.")
        self.announce("withheld", verdict.reason, name=peer.name, reason=reason, recipients=recipients)
        if replacing is None:
            self.floor.end_turn(peer.name, TurnEnd.WITHHELD, next_speaker=verdict.impersonated)
            self.publish_floor()
        return verdict

    def _take_back(self, peer: Peer, discard: Discard) -> None:
        """A model took back an attempt a guard would withhold, to try again: keep it, and void what it streamed.

        Listeners that saw its partials get a ``withdrawn`` frame, so nothing of the attempt stays
        on a screen as if it had been said.
        """
        if peer.role is not Role.MODEL:
            raise ProtocolError(ErrorCode.BAD_FRAME, "Only a model takes back a reply.")
        self.meter(peer)
        self.transcript.withheld(peer.name, peer.role.value, discard.content, discard.reason)
        log.info("%s took back an attempt (%s): %s", peer.name, discard.reason, discard.content)
        turn = self.floor.turn
        if discard.turn != turn or peer.name not in self.floor.speakers():
            return  # not this turn's reply (a /retry's, or a late one): nothing of it was streamed now
        if peer.draft_turn == turn:
            peer.drafted, peer.draft_bytes = "", 0  # /stop keeps only what the next attempt streams
        why = TAKEN_BACK_BECAUSE.get(discard.reason, "a guard would have withheld it")
        self._send([other for other in self._readers(self._reply_recipients(peer.name))
                    if other.wants_stream and other is not peer],
                   encode(Withdrawn(peer.name, f"{peer.name} took back a reply: {why}.", discard.reason, turn)))

    def ask_again(self, by: Peer, name: str | None) -> None:
        """``/retry [NAME]``: ask the author of the latest reply (NAME's, or any model's) to write it again.

        The new version comes back as a message naming the old one (``_replace``); it is held no turn.
        """
        author = None
        if name is not None:
            author = self.find(name)
            if author is None or author.role is not Role.MODEL:
                raise ProtocolError(ErrorCode.BAD_ARGUMENT, f"No model called {name!r} is in the room.")
        target = self.messages.latest_reply(author.name if author else None)
        if target is None:
            whose = f"{author.name}'s" if author else "a model's"
            raise ProtocolError(ErrorCode.BAD_ARGUMENT, f"The hub holds no reply of {whose} to write again.")
        author = author or self.find(target.sender)
        if author is None:
            raise ProtocolError(ErrorCode.BAD_ARGUMENT,
                                f"{target.sender} wrote the latest reply and has left, so it cannot write it again.")
        if not author.speaks_extensions:
            raise ProtocolError(ErrorCode.BAD_ARGUMENT,
                                f"{author.name}'s client speaks only the original protocol: it cannot write a "
                                "message again.")
        author.redo = target.id
        self.announce("retry", f"{by.name} asked {author.name} to write its last message again.", name=author.name,
                      recipients=Recipients.of(target))
        self.deliver(author, Redo(id=target.id, seq=target.seq))

    def _replace(self, peer: Peer, say: Say) -> None:
        """A model's new version of a message it was asked for again: a new number, naming the old message.

        Clients that understand ``replaces`` put it in the old one's place; others see a new message.
        """
        refusal = None
        if peer.muted:
            refusal = ErrorCode.MUTED, "You are muted by the moderator; your message was kept but not relayed."
        elif peer.role is not Role.MODEL or peer.redo is None or say.replaces != peer.redo:
            refusal = ErrorCode.NOT_YOUR_TURN, "Nobody asked for that message again; it was kept but not relayed."
        if refusal is not None:
            self.transcript.withheld(peer.name, peer.role.value, say.content, refusal[0].value)
            self.refuse(peer, *refusal)
            return
        if not say.content.strip() and not self.settings.guards:
            raise ProtocolError(ErrorCode.EMPTY, "The message is empty.")
        peer.redo = None
        old = next((chat for chat in self.messages if chat.id == say.replaces), None)
        content = say.content
        if self.settings.guards:
            verdict = self._guard(peer, content, replacing=old)
            if verdict.content is None:
                return
            content = verdict.content
        # The new version goes to whoever the old one went to (a whispered reply stays whispered).
        recipients = Recipients.of(old) if old is not None else self._reply_recipients(peer.name)
        self._relay(replace(self.messages.next_message(peer.name, content, peer.role.value), nonce=say.nonce,
                            replaces=say.replaces, recipients=recipients.personas, whisper=recipients.whisper), peer)

    def _decline_redo(self, peer: Peer, frame: Pass) -> None:
        """The model gave up writing its message again (``/retry``); the old version stands."""
        if peer.redo is None or frame.replaces != peer.redo:
            return
        old = next((chat for chat in self.messages if chat.id == peer.redo), None)
        peer.redo = None
        reason = f" ({frame.reason[:200]})" if frame.reason else ""
        self.announce("retry", f"{peer.name} could not write its message again{reason}; the old one stands.",
                      name=peer.name, recipients=Recipients.of(old) if old is not None else None)

    def _relay(self, chat: Chat, author: Peer) -> None:
        """Store a message (transcript first), then send it to its recipients; an extension author gets its echo."""
        self.transcript.message(chat)
        self.messages.keep(chat)
        log.info("%s: %s", chat.sender, chat.content, extra={"speaker": chat.sender})
        self._send_chat([other for other in self._everyone() if other is not author or author.speaks_extensions],
                        chat)

    def _send_chat(self, listeners: Iterable[Listener], chat: Chat) -> None:
        """Send a message to the listeners entitled to it; those who may only know a whisper happened get a trace."""
        full: list[Listener] = []
        traced: list[Listener] = []
        for listener in listeners:
            seen = sight(listener, Recipients.of(chat), self.settings.show_whispers)
            (full if seen is Sight.FULL else traced if seen is Sight.TRACE else []).append(listener)
        self._send(full, encode(chat))
        self._send(traced, encode(Notice(trace_sentence(chat), event="whisper")))

    def _readers(self, recipients: Recipients) -> list[Listener]:
        """Everyone in the room who may read in full what is said to ``recipients``.

        The one filter for partials, room events and turn frames; messages go through ``_send_chat``,
        which also sends traces.
        """
        return [listener for listener in self._everyone()
                if sight(listener, recipients, self.settings.show_whispers) is Sight.FULL]

    def visible_to(self, listener: Listener, chats: Iterable[Chat]) -> list[Chat]:
        """The messages among ``chats`` that ``listener`` is entitled to read in full."""
        return [chat for chat in chats
                if sight(listener, Recipients.of(chat), self.settings.show_whispers) is Sight.FULL]

    def _reply_recipients(self, name: str) -> Recipients:
        """Who hears a persona's reply (and its pieces, and news about it): private only after ``/whisper!``."""
        if self._private_reply == (name.casefold(), self.floor.turn):
            return Recipients((name,), whisper=True)
        return self.stage.public()

    def _about(self, name: str) -> Recipients:
        """Who hears news about a persona: the room, or, while it is off stage, only humans and spectators."""
        return self.stage.public() if self.stage.is_on(name) else NO_PERSONA

    def _names(self) -> list[str]:
        """Everyone a model could write a line for: who is here, and who spoke lately."""
        return [peer.name for peer in self.members] + [chat.sender for chat in self.messages.recent(REPEAT_WINDOW)]

    def _recent(self) -> list[Earlier]:
        return [Earlier(chat.sender, chat.content) for chat in self.messages.recent(REPEAT_WINDOW)]

    def stop_replies(self, by: Peer) -> None:
        """``/stop``: end the replies in progress now, keeping what each had streamed, and move on."""
        turn = self.floor.turn
        speakers = [self.find(name) for name in self.floor.speakers()]
        talking = [peer for peer in speakers
                   if peer is not None and (self.floor.mode is not Mode.FREE or peer.draft_turn == turn)]
        if not talking:
            raise ProtocolError(ErrorCode.NOTHING_TO_STOP, "No persona is speaking; there is nothing to stop.")
        for peer in talking:
            said = peer.drafted if peer.draft_turn == turn else ""
            recipients = self._reply_recipients(peer.name)
            if said.strip():
                self.announce("stop", f"{by.name} stopped {peer.name}.", name=peer.name, recipients=recipients)
                self._relay(replace(self.messages.next_message(peer.name, said, peer.role.value), interrupted=True,
                                    recipients=recipients.personas, whisper=recipients.whisper), peer)
            else:
                self.announce("stop", f"{by.name} stopped {peer.name} before it said anything.", name=peer.name,
                              recipients=recipients)
            self.floor.end_turn(peer.name, TurnEnd.STOPPED, said)
        self.publish_floor()

    def _why_withheld(self, peer: Peer, content: str, opening: bool,
                      turn: int | None) -> tuple[ErrorCode, str] | None:
        """Why a message must be kept out of the room, or None to relay it. Every check of a reply goes here."""
        if peer.muted:
            return ErrorCode.MUTED, "You are muted by the moderator; your message was kept but not relayed."
        if peer.role is not Role.MODEL:
            return None
        if not self.stage.is_on(peer.name):
            return ErrorCode.OFF_STAGE, "You are off stage; your message was kept but not relayed."
        if self.floor.paused:
            return ErrorCode.NOT_YOUR_TURN, "The room is paused; your message was kept but not relayed."
        if not self.floor.may_speak(peer.name, opening=opening):
            return ErrorCode.NOT_YOUR_TURN, "It is not your turn; your message was kept but not relayed."
        if turn is not None and turn != self.floor.turn and not opening:
            return ErrorCode.NOT_YOUR_TURN, "That reply was for an earlier turn; it was kept but not relayed."
        return None

    def _relay_partial(self, peer: Peer, partial: Partial) -> None:
        floor = self.floor
        if peer.role is not Role.MODEL or peer.name not in floor.speakers() or peer.muted:
            return
        if peer.draft_turn != floor.turn:
            peer.draft_turn, peer.draft_bytes, peer.drafted = floor.turn, 0, ""
        if not partial.content:
            return  # a sign of life (the first token), nothing to show
        peer.draft_bytes += len(partial.content)
        if peer.draft_bytes > DRAFT_BYTES_PER_TURN:
            return  # a reply that long streams no further; its final message still goes out whole
        peer.drafted += partial.content
        self._send([other for other in self._readers(self._reply_recipients(peer.name))
                     if other.wants_stream and other is not peer],
                   encode(RelayedPartial(sender=peer.name, content=partial.content, turn=floor.turn)))

    def _replay_to(self, peer: Listener, last_seq: int | None) -> None:
        """Late joiners get recent history; a reconnecting client gets exactly what it missed.

        Either way only what it was entitled to when it was said (see ``recipients``); a persona
        new to a room that runs scenes is replayed nothing at all (``admit``). Baseline model
        clients get no replay: they would answer every replayed message.
        """
        if isinstance(peer, Peer) and peer.role is Role.MODEL and not peer.speaks_extensions:
            return
        if last_seq is not None and last_seq > self.messages.seq:
            last_seq = None  # numbers from another conversation (a hub restarted without --resume)
        if last_seq is not None:
            missed, lost = self.messages.since(last_seq)
            if lost:
                self.deliver(peer, Notice(f"{lost} older messages are no longer held in memory; "
                                          f"they are in the transcript {self.transcript.location}.", event="gap"))
        else:
            missed = self.messages.recent(self.settings.replay, self._entitles(peer))
        for chat in missed:
            self._send_chat([peer], replace(chat, replay=True))

    def _entitles(self, listener: Listener) -> Callable[[Chat], bool]:
        """Whether a held message counts for ``listener``'s replay: it may be shown it, at least as a trace."""
        return lambda chat: sight(listener, Recipients.of(chat), self.settings.show_whispers) is not Sight.NOTHING

    # ------------------------------------------------------------ whispers and the stage

    def keep_reply_private(self, name: str) -> None:
        """``/whisper!``: the reply ``name`` gives in the turn it was just handed reaches only the moderators."""
        self._private_reply = (name.casefold(), self.floor.turn)

    def enter(self, names: Sequence[str], by: Peer) -> None:
        """Put personas on stage: they take turns again and receive what is said from now on."""
        self.stage.begin()
        for name in names:
            self.stage.enter(name)
            peer = self.find(name)
            if peer is not None and peer.role is Role.MODEL:
                self.floor.add_model(peer.name, self.floor.talkativeness.get(peer.name, DEFAULT_TALKATIVENESS))
        self._record_stage()
        if names:
            self.announce("enter", f"{by.name} brought {', '.join(names)} on stage.", names=", ".join(names))
        self._show_floor(names)

    def exit(self, names: Sequence[str], by: Peer) -> None:
        """Take personas off stage: still connected, but they take no turns and receive nothing."""
        self.stage.begin()
        if names:
            self.announce("exit", f"{by.name} took {', '.join(names)} off stage.", names=", ".join(names))
        for name in names:
            self.stage.exit(name)
            self.floor.remove_model(name)
        self._record_stage()
        self._show_floor(names)

    def _show_floor(self, names: Sequence[str]) -> None:
        """Who just came on or went off stage learns where the floor stands: turn frames skip the off-stage."""
        state = self.floor_state()
        for name in names:
            peer = self.find(name)
            if peer is not None and peer.speaks_extensions:
                self.deliver(peer, state)

    def _record_stage(self) -> None:
        self.transcript.stage(self.stage.on_stage(), self.stage.off_stage())
        self.publish_presence()

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
        """Tell extension-speaking peers who may speak, when that changed, and time the new turn.

        When the models have just fallen quiet, one event says why first.
        """
        quiet = self.floor.take_quiet()
        if quiet is not None:
            self.announce("quiet", f"The models are quiet: {quiet.sentence}.", reason=quiet.value)
        state = self.floor_state()
        if state == self._last_floor:
            return
        self._last_floor, self._last_floor_text = state, encode(state)
        self._time_turn(state)
        self._send([peer for peer in self._readers(self.stage.public()) if peer.speaks_extensions],
                   self._last_floor_text)

    def _pass_turn(self, peer: Peer, frame: Pass) -> None:
        stale = frame.turn is not None and frame.turn != self.floor.turn
        if peer.role is not Role.MODEL or peer.name not in self.floor.speakers() or stale:
            return
        reason = f" ({frame.reason[:200]})" if frame.reason else ""
        self.announce("pass", f"{peer.name} passed its turn{reason}", name=peer.name,
                      recipients=self._reply_recipients(peer.name))
        self.floor.end_turn(peer.name, TurnEnd.PASSED)
        self.publish_floor()

    def _time_turn(self, state: FloorState) -> None:
        """A model that holds the turn and sends nothing, or never finishes, must not stall the room."""
        for timer in self._turn_timers:
            timer.cancel()
        self._turn_timers.clear()
        if len(state.speakers) != 1:
            return
        holder, turn = state.speakers[0], state.turn
        if self.settings.first_token_timeout > 0:
            self._turn_timers.append(self.outlet.call_later(self.settings.first_token_timeout,
                                                            lambda: self._first_token_expired(holder, turn)))
        if self.settings.turn_timeout > 0:
            self._turn_timers.append(self.outlet.call_later(self.settings.turn_timeout,
                                                            lambda: self._turn_expired(holder, turn)))

    def _first_token_expired(self, holder: str, turn: int) -> None:
        peer = self.find(holder)
        if self.floor.turn != turn or self.floor.speakers() != (holder,) or (peer and peer.heard_turn == turn):
            return
        self.announce("skip", f"{holder} sent nothing for {self.settings.first_token_timeout:g} s; it is skipped "
                              "until it answers again.", name=holder, recipients=self._reply_recipients(holder))
        self.floor.skip(holder)
        self.floor.end_turn(holder, TurnEnd.TIMED_OUT)
        self.publish_floor()

    def _turn_expired(self, holder: str, turn: int) -> None:
        if self.floor.turn != turn or self.floor.speakers() != (holder,):
            return
        self.announce("pass", f"{holder} did not answer within {self.settings.turn_timeout:.0f} s; "
                              "its turn passes on", name=holder, recipients=self._reply_recipients(holder))
        self.floor.end_turn(holder, TurnEnd.TIMED_OUT)
        self.publish_floor()

    # ------------------------------------------------------------ what goes to whom

    def deliver(self, peer: Listener, frame: ServerFrame) -> None:
        self._send([peer], encode(frame))

    def _presence(self) -> Presence:
        return Presence(
            participants=tuple(
                {"name": p.name, "role": p.role.value, "moderator": p.is_moderator, "muted": p.muted,
                 "colour": speaker_colour_index(p.name), **self.stage_mark(p)}
                for p in self.members
            ),
            spectators=len(self.spectators),
        )

    def stage_mark(self, peer: Peer) -> dict[str, bool]:
        """``on_stage`` for a persona in a room that runs scenes, for the roster and the page."""
        return {"on_stage": self.stage.is_on(peer.name)} if peer.role is Role.MODEL and self.stage.running else {}

    def publish_presence(self) -> None:
        """Tell the pages (spectators and streaming humans) who is here, when that changed."""
        presence = self._presence()
        if presence == self._last_presence:
            return
        self._last_presence = presence
        if self._count_timer is not None:
            self._count_timer.cancel()
            self._count_timer = None
        self._send([listener for listener in self._everyone() if listener.wants_stream], encode(presence))

    def _count_spectators_soon(self) -> None:
        """A spectator came or went: say the new count once, a moment later, for every change meanwhile."""
        if self._count_timer is None and not self.closing:
            self._count_timer = self.outlet.call_later(SPECTATOR_COUNT_PERIOD, self._count_now)

    def _count_now(self) -> None:
        self._count_timer = None
        self.publish_presence()

    def refuse(self, peer: Listener, code: ErrorCode, sentence: str) -> None:
        """Tell a peer why something was refused, in the form it understands."""
        frame: ServerFrame = (
            Refusal(code=code, content=sentence)
            if peer.speaks_extensions
            else Notice(sentence, event="error", code=code)
        )
        self.deliver(peer, frame)

    def announce(self, event: str, sentence: str, *, exclude: Peer | None = None,
                 recipients: Recipients | None = None, **fields: str) -> None:
        """Record a room event and tell whoever may hear it: by default, everyone on stage."""
        self.transcript.event(event, sentence, **fields)
        log.info("%s", sentence, extra={"speaker": fields.get("name")})
        readers = self._readers(self.stage.public() if recipients is None else recipients)
        self._send([listener for listener in readers if listener is not exclude],
                   encode(Notice(sentence, event=event, reason=fields.get("reason"))))

    def _send(self, recipients: Iterable[Listener], text: str) -> None:
        """Hand one encoded frame to the outlet for the recipients still in the room."""
        present = [peer for peer in recipients
                   if (peer in self.spectators if isinstance(peer, Spectator) else self.is_present(peer))]
        if present:
            self.outlet.send(present, text)

    def shut_down(self) -> list[Listener]:
        """Say the hub is stopping and empty the room; returns the connections that must close."""
        self.closing = True
        for timer in (*self._turn_timers, self._count_timer):
            if timer is not None:
                timer.cancel()
        self.announce("shutdown", "The hub is stopping.", recipients=EVERYONE)
        # The shutdown record speaks for everyone; no leave records after it.
        return [*self.members.clear(), *self.spectators.clear()]

    def close(self) -> None:
        """Write the transcript out; call after the peers' connections are closed."""
        self.transcript.close()
