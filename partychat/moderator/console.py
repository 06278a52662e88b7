"""The moderator's console: what a person types becomes frames, what the hub sends becomes lines.

On a terminal, prompt_toolkit keeps the line being typed intact while room text scrolls above it,
and shows replies that are still being generated live in the bottom bar. With stdin from a pipe,
lines are read plainly, so a session file can be replayed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aioconsole

from ..display import DIM, colour_wanted, neutralise, paint, speaker_colour
from ..protocol import (
    Chat,
    Command,
    FloorState,
    Notice,
    Refusal,
    RelayedPartial,
    Roster,
    Say,
    ServerFrame,
    Withdrawn,
    listed_commands,
)

HUB_COMMANDS = listed_commands()
LOCAL_COMMANDS = {
    "help": "this list",
    "toggle": "show or hide incoming messages",
    "save": "/save [PATH]: write the transcript the hub holds as Markdown (default logs/chat-TIME.md)",
    "quit": "leave (Ctrl+C and end of input do too)",
}


@dataclass(frozen=True)
class Local:
    """A command the console handles itself."""

    name: str
    args: tuple[str, ...] = ()


class InputError(ValueError):
    """A typed line that is neither a message nor a known command."""


def parse_line(line: str) -> Say | Command | Local | None:
    """What a typed line means; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    if not text.startswith("/") or text.startswith("//"):
        return Say(text[1:] if text.startswith("//") else text)
    name, *args = text[1:].split()
    name = name.lower()
    if name in LOCAL_COMMANDS:
        return Local(name, tuple(args))
    if name in HUB_COMMANDS:
        return Command(name, tuple(args))
    raise InputError(f"Unknown command /{name}; type /help for the list (start a message with // to send a literal /).")


def help_text() -> str:
    rows = [f"  /{name:<7} {text}" for name, text in {**HUB_COMMANDS, **LOCAL_COMMANDS}.items()]
    return "Commands:\n" + "\n".join(rows) + "\nAnything else is sent to the room as a message."


class RoomView:
    """Turns hub frames into display lines; keeps what it has seen for /save on a baseline hub."""

    def __init__(self, own_name: str, *, colour: bool, show_messages: bool = True) -> None:
        self.own_name = own_name
        self.colour = colour
        self.show_messages = show_messages
        self.seen: list[Chat] = []
        self.drafts: dict[str, str] = {}
        self._shown_speakers: tuple[str, ...] = ()

    def stamp(self, ts: float | None = None) -> str:
        return paint(time.strftime("[%H:%M:%S]", time.localtime(ts or time.time())), DIM, self.colour)

    def status(self, text: str) -> str:
        return f"{self.stamp()} {paint('* ' + neutralise(text), DIM, self.colour)}"

    def render(self, frame: ServerFrame) -> str | None:
        if isinstance(frame, Chat):
            self.drafts.pop(frame.sender, None)
            self._keep(frame)
            if not self.show_messages and frame.sender != self.own_name:
                return None
            name = paint(neutralise(frame.sender, keep_newlines=False), speaker_colour(frame.sender), self.colour)
            marker = paint(" (earlier)", DIM, self.colour) if frame.replay else ""
            if frame.interrupted:
                marker += paint(" (stopped)", DIM, self.colour)
            if frame.whisper:
                marker += paint(f" (whispered to {neutralise(frame.whispered_to, keep_newlines=False)})", DIM,
                                self.colour)
            if frame.replaces:
                marker += paint(" (written again, in place of its last message)", DIM, self.colour)
            return f"{self.stamp(frame.ts or None)} {name}{marker}: {neutralise(frame.content)}"
        if isinstance(frame, RelayedPartial):
            self.drafts[frame.sender] = self.drafts.get(frame.sender, "") + frame.content
            return None
        if isinstance(frame, Withdrawn):
            self.drafts.pop(frame.sender, None)  # what it streamed of that attempt was never said
            return self.status(frame.content)
        if isinstance(frame, Notice):
            return self.status(frame.content)
        if isinstance(frame, Refusal):
            return f"{self.stamp()} {paint('! ' + neutralise(frame.content), speaker_colour('!'), self.colour)}"
        if isinstance(frame, FloorState):
            self.drafts = {k: v for k, v in self.drafts.items() if k in frame.speakers and not frame.paused}
            return self._turn_change(frame)
        if isinstance(frame, Roster):
            return self.status(frame.content)
        return None

    def _keep(self, chat: Chat) -> None:
        """Remember a message for /save; a new version (``/retry``) takes the old one's place."""
        index = next((i for i, old in enumerate(self.seen) if chat.replaces and old.id == chat.replaces), None)
        if index is None:
            self.seen.append(chat)
        else:
            self.seen[index] = chat

    def _turn_change(self, floor: FloorState) -> str | None:
        """A status line when the floor passes to someone else (pauses have their own notices)."""
        speakers = () if floor.paused else floor.speakers
        if speakers == self._shown_speakers:
            return None
        self._shown_speakers = speakers
        if not speakers:
            return None  # the hub's "quiet" event says why
        who = neutralise(floor.holder, keep_newlines=False)  # the hub's words, as the page shows them
        return self.status(f"Turn: {who} ({floor.turns_left} model turn{'s' if floor.turns_left != 1 else ''} left)")

    def toolbar(self) -> str:
        """One line per reply being generated, for the bottom bar."""
        lines = []
        for sender, text in self.drafts.items():
            tail = neutralise(" ".join(text.split()), keep_newlines=False)[-100:]
            lines.append(f"{neutralise(sender, keep_newlines=False)} is writing: {tail}")
        return "\n".join(lines)


class Terminal:
    """Line input and output that never tear each other apart."""

    def __init__(self, prompt: str = "> ") -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.colour = colour_wanted(sys.stdout)
        self._prompt = prompt
        self._session = None
        self._toolbar: Callable[[], str] | None = None

    def attach_toolbar(self, toolbar: Callable[[], str]) -> None:
        self._toolbar = toolbar

    async def read_line(self) -> str | None:
        """The next typed line, or None at end of input. Ctrl+C raises KeyboardInterrupt."""
        if self.interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.patch_stdout import patch_stdout

            if self._session is None:
                self._session = PromptSession(
                    erase_when_done=True,
                    bottom_toolbar=lambda: (self._toolbar() if self._toolbar else "") or None,
                    refresh_interval=0.3,
                )
            try:
                with patch_stdout(raw=True):
                    return await self._session.prompt_async(self._prompt)
            except EOFError:
                return None
        try:
            line = await aioconsole.ainput()
        except EOFError:
            return None
        return line.rstrip("\r")

    def show(self, line: str) -> None:
        print(line, flush=True)
