"""Floor control: which model may speak now. Pure logic, no I/O, so the rules are easy to test.

The hub owns one Floor. A moderator message opens a budget of model turns; each relayed model
message spends one; when the budget is spent the room waits for the moderator again. That budget
is what makes a conversation between models end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


class Mode(str, Enum):
    ROUND_ROBIN = "round-robin"
    MENTION = "mention"
    MODERATOR = "moderator"
    FREE = "free"


@dataclass
class Floor:
    mode: Mode = Mode.ROUND_ROBIN
    max_turns: int | None = None
    """Model messages allowed after each moderator message; None means one per model in the room."""

    models: list[str] = field(default_factory=list)
    holder: str | None = None
    turns_left: int = 0
    paused: bool = False
    turn: int = 0
    """Increases every time the floor changes hands, so stale replies can be recognised."""

    _next_index: int = field(default=0, init=False, repr=False)
    _spoken: set[str] = field(default_factory=set, init=False, repr=False)
    """Models that have said something in this room run; each may open with one line, once."""

    @property
    def budget(self) -> int:
        return self.max_turns if self.max_turns is not None else len(self.models)

    def speakers(self) -> tuple[str, ...]:
        """Models allowed to speak right now."""
        if self.paused or self.turns_left <= 0:
            return ()
        if self.mode is Mode.FREE:
            return tuple(self.models)
        return (self.holder,) if self.holder else ()

    def may_speak(self, name: str, *, opening: bool = False) -> bool:
        if self.paused:
            return False
        if opening and name not in self._spoken:
            return True
        return name in self.speakers()

    def add_model(self, name: str) -> None:
        if name not in self.models:
            self.models.append(name)

    def remove_model(self, name: str) -> None:
        if name not in self.models:
            return
        index = self.models.index(name)
        self.models.remove(name)
        if index < self._next_index:
            self._next_index -= 1
        if self.holder == name:
            self._hand_over()

    def on_moderator_message(self, content: str, addressed: str | None = None) -> None:
        """A moderator spoke: open a fresh budget and pick who answers first."""
        self.turns_left = self.budget
        target = addressed or self.mentioned(content)
        if target is None and self.mode is Mode.MODERATOR:
            self.turns_left = 0
        if target is not None:
            self._give(target)
            if self.mode is Mode.MODERATOR:
                self.turns_left = 1
        else:
            self._hand_over()

    def on_model_message(self, name: str, content: str = "") -> None:
        """A model's message was relayed: spend a turn and pass the floor on.

        An opening line (allowed once per name, outside the order) spends nothing and moves nothing.
        """
        if name not in self.speakers():
            self._spoken.add(name)
            return
        self._spoken.add(name)
        self.turns_left -= 1
        if self.turns_left <= 0:
            self.holder = None
            self.turn += 1
            return
        target = self.mentioned(content) if self.mode is Mode.MENTION else None
        if target is not None and target != name:
            self._give(target)
        else:
            self._hand_over(after=name)

    def mentioned(self, content: str) -> str | None:
        """The model a message addresses by name, if mention routing applies."""
        if self.mode not in (Mode.MENTION, Mode.MODERATOR):
            return None
        lowered = content.casefold()
        best: tuple[int, str] | None = None
        for name in self.models:
            match = re.search(r"(?<!\w)@?" + re.escape(name.casefold()) + r"(?!\w)", lowered)
            if match and (best is None or match.start() < best[0]):
                best = (match.start(), name)
        return best[1] if best else None

    def pause(self) -> None:
        self.paused = True
        self.turn += 1

    def resume(self) -> None:
        self.paused = False
        self.turn += 1

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        self.turn += 1
        if mode is Mode.MODERATOR:
            self.holder = None
            self.turns_left = 0

    def set_max_turns(self, max_turns: int | None) -> None:
        self.max_turns = max_turns
        self.turns_left = min(self.turns_left, self.budget)
        self.turn += 1

    def _give(self, name: str) -> None:
        self.holder = name
        self._next_index = (self.models.index(name) + 1) % max(len(self.models), 1)
        self.turn += 1

    def _hand_over(self, after: str | None = None) -> None:
        if not self.models or self.turns_left <= 0 or self.mode is Mode.MODERATOR:
            self.holder = None
            self.turns_left = 0 if self.mode is Mode.MODERATOR else self.turns_left
            self.turn += 1
            return
        if after in self.models:
            self._next_index = (self.models.index(after) + 1) % len(self.models)
        self._give(self.models[self._next_index % len(self.models)])
