"""Floor control: which model may speak now. Pure logic, no I/O, so the rules are easy to test.

The hub owns one Floor. A moderator message opens a budget of model turns; each turn a model ends
(by speaking, passing, timing out, being stopped or having its reply withheld) spends one; when the
budget is spent the room waits for the moderator again. That budget is what makes a conversation
between models end. Each time the models fall quiet the floor records why (``Quiet``), so the room
can say so in one event.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from enum import Enum

DEFAULT_TALKATIVENESS = 0.5


class Mode(str, Enum):
    ROUND_ROBIN = "round-robin"
    MENTION = "mention"
    MODERATOR = "moderator"
    FREE = "free"
    NATURAL = "natural"


class TurnEnd(str, Enum):
    """How a model's turn ended."""

    SPOKE = "spoke"
    PASSED = "passed"
    TIMED_OUT = "timed_out"
    STOPPED = "stopped"
    WITHHELD = "withheld"


class Quiet(str, Enum):
    """Why the models stopped speaking; the value is the ``reason`` of the room's ``quiet`` event."""

    BUDGET = "budget"
    PAUSED = "paused"
    PASSED = "passed"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    WITHHELD = "withheld"
    NOT_ADDRESSED = "not_addressed"
    NO_MODELS = "no_models"

    @property
    def sentence(self) -> str:
        return _QUIET_SENTENCES[self]


_QUIET_SENTENCES = {
    Quiet.BUDGET: "the turn budget is spent",
    Quiet.PAUSED: "the room is paused",
    Quiet.PASSED: "every persona passed",
    Quiet.TIMEOUT: "the persona holding the turn did not answer in time",
    Quiet.STOPPED: "the moderator stopped the last reply",
    Quiet.WITHHELD: "a guard withheld the last reply",
    Quiet.NOT_ADDRESSED: "in moderator mode a persona speaks only when addressed by name",
    Quiet.NO_MODELS: "no persona that answers is left in the room",
}
_QUIET_AFTER = {
    TurnEnd.SPOKE: Quiet.BUDGET,
    TurnEnd.PASSED: Quiet.BUDGET,
    TurnEnd.TIMED_OUT: Quiet.TIMEOUT,
    TurnEnd.STOPPED: Quiet.STOPPED,
    TurnEnd.WITHHELD: Quiet.WITHHELD,
}
"""Why the room is quiet when the last turn of the budget ended this way."""


def mentions(content: str, names: list[str], author: str | None = None) -> str | None:
    """The first of ``names`` written in ``content`` as a whole word (any case, optional @), never the author."""
    lowered = content.casefold()
    best: tuple[int, str] | None = None
    for name in names:
        if author is not None and name.casefold() == author.casefold():
            continue
        match = re.search(r"(?<!\w)@?" + re.escape(name.casefold()) + r"(?!\w)", lowered)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), name)
    return best[1] if best else None


@dataclass
class Floor:
    mode: Mode = Mode.ROUND_ROBIN
    max_turns: int | None = None
    """Model messages allowed after each moderator message; None means one per model in the room."""
    seed: int | None = None
    """Seeds natural mode's draws, so the same conversation picks the same speakers."""

    models: list[str] = field(default_factory=list)
    """Models in the room, in the order they first joined (a model that comes back keeps its seat)."""
    holder: str | None = None
    turns_left: int = 0
    paused: bool = False
    turn: int = 0
    """Increases every time the floor changes hands, so stale replies can be recognised."""
    talkativeness: dict[str, float] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    """Models that did not answer in time: they keep their seat but get no turn until they answer again."""
    quiet: Quiet | None = None
    """Why the models just fell quiet; the room reads it with ``take_quiet`` and says it once."""

    _next_index: int = field(default=0, init=False, repr=False)
    _spoken: set[str] = field(default_factory=set, init=False, repr=False)
    """Models that have said something in this room run; each may open with one line, once."""
    _seats: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _passed: set[str] = field(default_factory=set, init=False, repr=False)
    """Models that passed since the last message was relayed."""
    _live: bool = field(default=False, init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def budget(self) -> int:
        return self.max_turns if self.max_turns is not None else len(self.models)

    def speakers(self) -> tuple[str, ...]:
        """Models allowed to speak right now."""
        if self.paused or self.turns_left <= 0:
            return ()
        if self.mode is Mode.FREE:
            return tuple(name for name in self.models if name not in self.skipped)
        return (self.holder,) if self.holder else ()

    def may_speak(self, name: str, *, opening: bool = False) -> bool:
        if self.paused:
            return False
        if opening and name not in self._spoken:
            return True
        return name in self.speakers()

    def add_model(self, name: str, talkativeness: float = DEFAULT_TALKATIVENESS) -> None:
        """Seat a model; one that was here before gets its old place in the order back."""
        self.talkativeness[name] = talkativeness
        if name in self.models:
            return
        seat = self._seats.setdefault(name, len(self._seats))
        index = sum(1 for other in self.models if self._seats[other] < seat)
        self.models.insert(index, name)
        if index < self._next_index:
            self._next_index += 1
        self._settle()

    def remove_model(self, name: str) -> None:
        if name not in self.models:
            return
        index = self.models.index(name)
        self.models.remove(name)
        self.skipped.discard(name)
        self._passed.discard(name)
        if index < self._next_index:
            self._next_index -= 1
        if self.holder == name:
            self._hand_over()
        self._settle(Quiet.NO_MODELS)

    def skip(self, name: str) -> None:
        """Take a model that does not answer out of the rotation; it keeps its seat (see ``answered``)."""
        if name in self.models:
            self.skipped.add(name)

    def answered(self, name: str) -> bool:
        """A skipped model sent something: it is back in the rotation. True if it had been skipped."""
        if name not in self.skipped:
            return False
        self.skipped.discard(name)
        return True

    def on_moderator_message(self, content: str, addressed: str | None = None) -> None:
        """A moderator spoke: open a fresh budget and pick who answers first."""
        self._passed.clear()
        self._live = bool(self.models)  # a message models could answer: if none will, the room says why
        self.turns_left = self.budget
        target = addressed or self.mentioned(content)
        if target is None and self.mode is Mode.MODERATOR:
            self.turns_left = 0
        if target is not None:
            self._give(target)
            if self.mode is Mode.MODERATOR:
                self.turns_left = 1
        elif self.mode is Mode.NATURAL:
            self._draw()
        else:
            self._hand_over()
        if self.paused:
            self._settle(Quiet.PAUSED)
        elif self.budget <= 0:
            self._settle(Quiet.BUDGET)
        else:
            self._settle(Quiet.NOT_ADDRESSED if self.mode is Mode.MODERATOR else Quiet.NO_MODELS)

    def end_turn(self, name: str, how: TurnEnd, content: str = "", *, next_speaker: str | None = None) -> None:
        """A model's turn is over: spend one turn of the budget and give the floor to the next model.

        ``content`` is what was relayed (for mentions); ``next_speaker`` is a model that should
        speak next in natural mode (one another model just wrote a line for). A message from a model
        that does not hold the turn is an opening line (allowed once per name, outside the order):
        it spends nothing and moves nothing.
        """
        if name not in self.speakers():
            if how is TurnEnd.SPOKE:
                self._spoken.add(name)
            return
        self._spoken.add(name)
        if how is TurnEnd.PASSED:
            self._passed.add(name)
        else:
            self._passed.clear()
        self.turns_left -= 1
        if self.turns_left <= 0:
            self.holder = None
            self.turn += 1
            self._settle(_QUIET_AFTER[how])
            return
        if self._passed and self._passed >= set(self._eligible()):
            self.turns_left = 0
            self.holder = None
            self.turn += 1
            self._settle(Quiet.PASSED)
            return
        if self.mode is Mode.FREE:
            self._settle(_QUIET_AFTER[how])
            return
        target = None
        if self.mode is Mode.NATURAL and next_speaker in self._eligible(exclude=name):
            target = next_speaker
        elif self.mode in (Mode.MENTION, Mode.NATURAL) and content:
            target = mentions(content, self._eligible(), author=name)
        if target is not None:
            self._give(target)
        elif self.mode is Mode.NATURAL:
            self._draw(exclude=name)
        else:
            self._hand_over(after=name)
        self._settle(Quiet.TIMEOUT if self.skipped else _QUIET_AFTER[how])

    def mentioned(self, content: str) -> str | None:
        """The model a moderator's message addresses by name, if mention routing applies."""
        if self.mode not in (Mode.MENTION, Mode.MODERATOR, Mode.NATURAL):
            return None
        return mentions(content, self.models)

    def pause(self) -> None:
        self.paused = True
        self.turn += 1
        self._settle(Quiet.PAUSED)

    def resume(self) -> None:
        self.paused = False
        self.turn += 1
        self._settle()

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        self.turn += 1
        if mode is Mode.MODERATOR:
            self.holder = None
            self.turns_left = 0
        self._settle(Quiet.NOT_ADDRESSED)

    def set_max_turns(self, max_turns: int | None) -> None:
        self.max_turns = max_turns
        self.turns_left = min(self.turns_left, self.budget)
        self.turn += 1
        self._settle(Quiet.BUDGET)

    def take_quiet(self) -> Quiet | None:
        """Why the models fell quiet since the last call, once; None if they did not."""
        quiet, self.quiet = self.quiet, None
        return quiet

    def _settle(self, reason: Quiet = Quiet.BUDGET) -> None:
        """Record ``reason`` if the models were free to speak a moment ago and are not now."""
        live = bool(self.speakers())
        if self._live and not live:
            self.quiet = reason
        elif live:
            self.quiet = None
        self._live = live

    def _eligible(self, exclude: str | None = None) -> list[str]:
        """Models that may be given the turn: in the room, not skipped, not ``exclude`` unless it is alone."""
        present = [name for name in self.models if name not in self.skipped]
        others = [name for name in present if name != exclude]
        return others or present

    def _give(self, name: str) -> None:
        self.holder = name
        self._next_index = (self.models.index(name) + 1) % max(len(self.models), 1)
        self.turn += 1

    def _draw(self, exclude: str | None = None) -> None:
        """Natural mode: a draw weighted by talkativeness; nobody twice in a row unless alone.

        A persona with talkativeness 0 speaks only when named, unless every candidate is at 0.
        Candidates are drawn in name order, not join order, so a seed gives the same picks however
        the personas happened to connect.
        """
        candidates = sorted(self._eligible(exclude), key=str.casefold)
        if not candidates or self.turns_left <= 0:
            self._silence()
            return
        weights = [self.talkativeness.get(name, DEFAULT_TALKATIVENESS) for name in candidates]
        if sum(weights) <= 0:
            weights = [1.0] * len(candidates)
        self._give(self._rng.choices(candidates, weights)[0])

    def _silence(self) -> None:
        self.holder = None
        if self.mode is Mode.MODERATOR:
            self.turns_left = 0
        self.turn += 1

    def _hand_over(self, after: str | None = None) -> None:
        if self.mode is Mode.MODERATOR or self.turns_left <= 0:
            self._silence()
            return
        if self.mode is Mode.NATURAL:
            self._draw(exclude=after)
            return
        if after in self.models:
            self._next_index = (self.models.index(after) + 1) % len(self.models)
        for step in range(len(self.models)):
            name = self.models[(self._next_index + step) % len(self.models)]
            if name not in self.skipped:
                self._give(name)
                return
        self._silence()
