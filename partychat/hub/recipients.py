"""Who knows what: each message's recipients, the stage, and what a listener is shown. No I/O.

What a persona never received, it cannot know. So the room decides each message's recipients
once, when it is said, keeps them with the message, and every frame that carries the message
(or a piece of it, or news about it) is filtered through ``sight`` on its way out: live, in a
replay, in a history, after a reconnect and after ``--resume`` alike.

The rule, in one place:

- A persona receives a message only if it is among the message's recipients (``None``: every
  persona, which is how an ordinary room speaks).
- A human receives every message, except that a whisper reaches only the humans who moderate.
- A spectator, or a human who does not moderate, receives a whisper only as a trace ("a whisper
  went to NAME"), unless the hub runs with ``--show-whispers``, which shows spectators its content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from ..protocol import Chat, Role
from .spectators import Listener, Spectator


class Sight(Enum):
    """How much of a message one listener is shown."""

    FULL = "full"
    TRACE = "trace"
    """Only that a whisper happened, and to whom."""
    NOTHING = "nothing"


@dataclass(frozen=True)
class Recipients:
    personas: tuple[str, ...] | None = None
    """The personas that receive it; None means every persona (a room that runs no scenes)."""
    whisper: bool = False

    @classmethod
    def of(cls, chat: Chat) -> Recipients:
        return cls(chat.recipients, chat.whisper)

    def includes(self, name: str) -> bool:
        return self.personas is None or name.casefold() in {persona.casefold() for persona in self.personas}


EVERYONE = Recipients()
NO_PERSONA = Recipients(personas=())
"""Humans and spectators only: news about a persona that is off stage."""


def sight(listener: Listener, recipients: Recipients, show_whispers: bool = False) -> Sight:
    """What ``listener`` is shown of something said to ``recipients``."""
    if isinstance(listener, Spectator):
        return Sight.FULL if not recipients.whisper or show_whispers else Sight.TRACE
    if listener.role is Role.HUMAN:
        return Sight.FULL if not recipients.whisper or listener.is_moderator else Sight.TRACE
    return Sight.FULL if recipients.includes(listener.name) else Sight.NOTHING


def trace_sentence(chat: Chat) -> str:
    """What a spectator learns of a whisper: who whispered to whom, not what."""
    return f"{chat.sender} whispered to {chat.whispered_to}."


@dataclass
class Stage:
    """Which personas are on stage. Until a stage command is used (``running``), everyone is.

    The stage holds names, not connections: a persona on stage whose connection drops stays on
    stage, so what is said meanwhile is kept for it and replayed when it comes back.
    """

    running: bool = False
    """Once true (a stage command, or a persona that asked to start off stage), it stays true."""
    _on: dict[str, str] = field(default_factory=dict)
    _known: dict[str, str] = field(default_factory=dict)
    """Every persona that has been in this room, by case-folded name."""

    def knows(self, name: str) -> bool:
        return name.casefold() in self._known

    def is_on(self, name: str) -> bool:
        return not self.running or name.casefold() in self._on

    def known_name(self, name: str) -> str | None:
        """The persona's name as it joined, found in any case."""
        return self._known.get(name.casefold())

    def known(self) -> list[str]:
        return list(self._known.values())

    def on_stage(self) -> tuple[str, ...]:
        return tuple(self._on.values())

    def off_stage(self) -> tuple[str, ...]:
        return tuple(name for key, name in self._known.items() if key not in self._on)

    def public(self) -> Recipients:
        """The recipients of something said in the open: the personas on stage."""
        return Recipients(self.on_stage()) if self.running else EVERYONE

    def arrive(self, name: str, *, offstage: bool) -> bool:
        """A persona connected. Returns whether the stage changed (a new name, or one that asked to wait off stage).

        Asking to start off stage counts only on a persona's first arrival, so a reconnect never
        undoes an ``/enter``.
        """
        key = name.casefold()
        if key in self._known:
            return False
        if offstage:
            self.begin()
            self._known[key] = name
            return True
        self._known[key] = name
        if self.running:
            self._on[key] = name
        return self.running

    def begin(self) -> None:
        """Start running scenes: whoever has been in the room so far stands on stage."""
        if not self.running:
            self.running = True
            self._on = dict(self._known)

    def enter(self, name: str) -> None:
        self.begin()
        self._on[name.casefold()] = self._known[name.casefold()]

    def exit(self, name: str) -> None:
        self.begin()
        self._on.pop(name.casefold(), None)

    def restore(self, on: Iterable[str], off: Iterable[str]) -> None:
        """Take back the stage a transcript recorded (``--resume``)."""
        self.running = True
        self._on = {name.casefold(): name for name in on}
        self._known = {**self._on, **{name.casefold(): name for name in off}}
